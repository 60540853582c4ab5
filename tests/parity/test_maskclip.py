"""MaskCLIP's released code vs ovseg's ``maskclip`` protocol: set OVSEG_PARITY_MASKCLIP to a checkout (and install
mmcv 1.x as `make parity` does)."""

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import maskclip


def test_maskclip_protocol_matches_maskclips_pipeline(tmp_path):
    records = maskclip.run(reference_checkout("MaskCLIP"), work_dir=tmp_path, datasets=("voc20",),
                           image_sizes={"odd 397x541": (397, 541)}, feature_sizes={"odd 250x330": (250, 330)},
                           resnets=("RN50",))
    quantities = [r.quantity for r in records]
    for expected in ("label map voc20", "dense features RN50", "label map RN50 voc20", "label map KS+PD ViT16",
                     "label map KS+PD RN50", "label map PD RN50"):
        assert any(q.startswith(expected) for q in quantities), expected
    assert_all_passed(records)
