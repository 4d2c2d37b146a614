"""The DeepSpeed internals LGTM-DS reads are all still there (lgtm_ds/engines/ds_private.py):
on a DeepSpeed release that moved one, this fails naming it."""

from lgtm_ds.engines.ds_private import PRIVATE, missing


def test_every_private_deepspeed_attribute_we_read_exists():
    gone = missing()
    assert not gone, "DeepSpeed internals moved:\n" + "\n".join(gone)


def test_the_list_names_what_the_seams_read():
    names = {p.name for p in PRIVATE}
    for name in (
        "bit16_groups",
        "_hp_mapping",
        "ds_tensor",
        "parameter_offload",
        "FWD_MODULE_STACK",
    ):
        assert name in names
