"""ITACLIP's released code vs ovseg's ITACLIP under the ``itaclip`` protocol: set OVSEG_PARITY_ITACLIP to a
checkout."""

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import itaclip


def test_itaclip_matches_its_released_code(tmp_path):
    """Every released config: window logits under its img_eng_coefficient, text embeddings with its auxiliary file
    (Cityscapes' synonyms first: the window logits read its text), model inputs; label maps of Cityscapes on a small
    image (the record's label rows run on a GPU)."""
    datasets = ("cityscapes", "voc21", "context60", "coco_object", "coco_stuff171")
    assert set(datasets) == set(itaclip.DATASETS)
    records = itaclip.run(reference_checkout("ITACLIP"), work_dir=tmp_path, datasets=datasets,
                          label_datasets=("cityscapes",), image_sizes={"square 180x180": (180, 180)})
    for dataset in datasets:
        assert any(r.quantity.startswith("window logits engineered") and dataset in r.detail for r in records)
        assert any(r.quantity == f"text embeddings {dataset}" for r in records)
        assert any(r.quantity.startswith(f"model input {dataset}") for r in records)
    assert any(r.quantity.startswith("labels cityscapes") for r in records)
    assert_all_passed(records)
