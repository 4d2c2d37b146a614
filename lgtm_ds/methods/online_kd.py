"""Online KD (ProKT / DML style): the teacher learns from the student every step, no influence."""

from __future__ import annotations

from .base import METHODS, Method, distill_update


@METHODS.register
class OnlineKD(Method):
    name = "online_kd"
    summary = "each step: teacher on L_t = a_t KL_T(p_s || p_t) + (1 - a_t) CE, then student L_s"

    def teacher_update(self, micro, quiz):
        d = self.d
        d.teacher.module.train()
        d.student.module.train()
        (w,) = self.row_weights(micro)
        anchor = d.gold_anchor  # a sampled step: a_t KD here + (1 - a_t) CE on the gold rows
        loss = distill_update(d.teacher, d.student, micro, d.teacher_loss, w, d.hidden, "teacher",
                              anchor, d.task)  # fmt: skip
        return {"teacher_loss": loss}
