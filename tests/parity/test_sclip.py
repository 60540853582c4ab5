"""SCLIP's released code vs ovseg's ``sclip`` protocol: set OVSEG_PARITY_SCLIP to a checkout."""

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import sclip


def test_sclip_protocol_matches_sclips_pipeline(tmp_path):
    records = sclip.run(reference_checkout("SCLIP"), work_dir=tmp_path, datasets=("voc21",), full_text=False,
                        image_sizes={"odd 397x541": (397, 541)})
    assert any(r.quantity.startswith("labels voc21") for r in records)
    assert_all_passed(records)
