"""SC-CLIP's released code vs ovseg's SCCLIP and ``scclip`` protocol: set OVSEG_PARITY_SC_CLIP to a checkout."""

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import scclip


def test_scclip_matches_the_released_code(tmp_path):
    records = scclip.run(reference_checkout("SC-CLIP"), work_dir=tmp_path, datasets=("voc21",), full_text=False,
                         image_sizes={"odd 397x541": (397, 541)})
    assert any(r.quantity.startswith("labels voc21") for r in records)
    assert any(r.quantity.startswith("dense tokens") for r in records)
    assert any(r.quantity.startswith("anomaly tokens") for r in records)
    assert_all_passed(records)
