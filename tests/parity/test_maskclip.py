"""MaskCLIP's released code vs ovseg's ``maskclip`` protocol: set OVSEG_PARITY_MASKCLIP to a checkout (and install
mmcv 1.x as `make parity` does)."""

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import maskclip


def test_maskclip_protocol_matches_maskclips_pipeline(tmp_path):
    records = maskclip.run(reference_checkout("MaskCLIP"), work_dir=tmp_path, datasets=("voc20",),
                           image_sizes={"odd 397x541": (397, 541)}, feature_sizes={"224x224": (224, 224)})
    assert any(r.quantity.startswith("label map voc20") for r in records)
    assert_all_passed(records)
