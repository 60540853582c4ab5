"""PixelCLIP's released code vs ovseg (small ViT, two image sizes): set OVSEG_PARITY_PIXELCLIP to a checkout."""

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import pixelclip, pixelclip_train


def test_pixelclip_protocol_matches_the_authors_test_path(tmp_path):
    records = pixelclip.run(reference_checkout("PixelCLIP"), work_dir=tmp_path, model_name=pixelclip_train.SMALL_VIT,
                            datasets=("voc20", "context59"), dense_sides=(224, 330), training=False,
                            image_sizes={"voc 375x500": (375, 500), "odd 397x541": (397, 541)})
    assert sum(r.quantity.startswith("labels") for r in records) == 6  # and ADE-847's first classes (synonyms)
    assert any(r.quantity == "text embeddings ade847" and "14 with synonyms" in r.detail for r in records)
    assert_all_passed(records)


def test_pixelclip_training_step_matches_the_authors(tmp_path):
    records = pixelclip_train.training_records(reference_checkout("PixelCLIP"), work_dir=tmp_path,
                                               model_name=pixelclip_train.SMALL_VIT, image_size=320)
    assert any(r.quantity == "training loss" for r in records)
    assert_all_passed(records)
