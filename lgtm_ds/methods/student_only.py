"""The student alone on its task loss (labels / completions): the no-distillation baseline that
every distillation method has to beat. The teacher is neither trained nor run."""

from __future__ import annotations

from .base import METHODS, Method, task_update


@METHODS.register
class StudentOnly(Method):
    name = "student_only"
    summary = "no distillation: the student on its task loss alone (the teacher is not used)"
    trains_teacher = False
    on_policy = False  # nothing to distil on sampled completions

    def student_update(self, micro: list[dict]) -> dict:
        self.d.student.module.train()
        (w,) = self.row_weights(micro)
        return {"student_loss": task_update(self.d.student, self.d.task, micro, w)}
