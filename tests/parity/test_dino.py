"""PixelCLIP's get_dino_masks (the hub DINO ViT-S/16 + fast_pytorch_kmeans) vs ovseg's DinoMasker: set
OVSEG_PARITY_DINO to a facebookresearch/dino checkout and OVSEG_PARITY_PIXELCLIP to a PixelCLIP one."""

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import dino


def test_dino_masks_match_pixelclips(tmp_path):
    records = dino.run(reference_checkout("DINO"), work_dir=tmp_path, pixelclip_dir=reference_checkout("PixelCLIP"),
                       sizes={"odd 250x330": (250, 330)})
    assert [r.quantity.split(" ")[:2] for r in records] == [["weights:", "hub"], ["DINO", "features"],
                                                            ["DINO", "masks"]]
    assert_all_passed(records)
