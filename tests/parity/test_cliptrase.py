"""CLIPtrase's released clip_self_correlation.py vs ovseg's CLIPtrase under the ``cliptrase`` protocol: set
OVSEG_PARITY_CLIPTRASE to a checkout."""

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import cliptrase


def test_cliptrase_matches_its_released_code(tmp_path):
    records = cliptrase.run(reference_checkout("CLIPtrase"), work_dir=tmp_path, datasets=("voc21",),
                            image_sizes={"odd 397x541": (397, 541)})
    assert any(r.quantity.startswith("dense tokens 336") for r in records)
    assert any(r.quantity.startswith("DBSCAN labels") for r in records)
    assert any(r.quantity.startswith("labels voc21 336") for r in records)
    assert_all_passed(records)
