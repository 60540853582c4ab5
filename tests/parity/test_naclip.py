"""NACLIP's released code vs ovseg's ``naclip`` protocol: set OVSEG_PARITY_NACLIP to a checkout."""

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import naclip


def test_naclip_protocol_matches_naclips_pipeline(tmp_path):
    records = naclip.run(reference_checkout("NACLIP"), work_dir=tmp_path, datasets=("voc21",), full_text=False,
                         image_sizes={"odd 397x541": (397, 541)})
    assert any(r.quantity.startswith("labels voc21") for r in records)
    assert any(r.quantity.startswith("labels PAMR voc21") for r in records)
    assert any(r.quantity.startswith("PAMR output") for r in records)
    assert_all_passed(records)
