"""ITACLIP's released code vs ovseg's ITACLIP under the ``itaclip`` protocol: set OVSEG_PARITY_ITACLIP to a
checkout."""

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import itaclip


def test_itaclip_matches_its_released_code(tmp_path):
    records = itaclip.run(reference_checkout("ITACLIP"), work_dir=tmp_path, datasets=("cityscapes",),
                          image_sizes={"square 180x180": (180, 180)})
    assert any(r.quantity.startswith("window logits engineered") for r in records)
    assert any(r.quantity.startswith("text embeddings cityscapes") for r in records)
    assert any(r.quantity.startswith("labels cityscapes") for r in records)
    assert_all_passed(records)
