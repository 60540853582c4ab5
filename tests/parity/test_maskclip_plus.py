"""One MaskCLIP+ training step against MaskCLIP's released ``maskclip_plus_head.py``: set OVSEG_PARITY_MASKCLIP to a
checkout (and install mmcv 1.x as `make parity` does)."""

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import maskclip_plus


def test_maskclip_plus_training_step_matches_the_reference(tmp_path):
    records = maskclip_plus.run(reference_checkout("MaskCLIP"), work_dir=tmp_path, crop=64)
    assert {r.quantity.split(",")[0] for r in records} >= {"pseudo labels", "loss", "student gradients"}
    assert_all_passed(records)
