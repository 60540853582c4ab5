"""`ovseg weights convert-pixelclip` and `ovseg masks sam|dino|downscale` on tiny models and generated data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ovseg.cli import main
from ovseg.data.sa1b import decode_masks, load_masks, write_synthetic_sa1b
from ovseg.methods.pixelclip.data import SA1B
from ovseg.data.synthetic import write_synthetic
from ovseg.methods.pixelclip import PixelCLIP
from ovseg.models.clip import CLIPConfig

REPO = Path(__file__).resolve().parents[2]
TINY_KW = dict(clip=dict(name="tiny-vit", pretrained=None, last_block="value", residual="cls", ffn=True),
               clip_resolution=64, mask_resolution=32, num_clusters=8)


def _official_state_dict(model: PixelCLIP) -> dict[str, torch.Tensor]:
    """The authors' key names, built independently of the converter's mapping."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("encoder.model."):
            state["sem_seg_head.predictor.clip_model." + key[len("encoder.model."):]] = value.clone()
        elif key.startswith("teacher.model.visual."):
            state["teacher_encoder." + key[len("teacher.model."):]] = value.clone()
        elif key == "prompts.tokens":
            state["sem_seg_head.predictor.prompt_tokens"] = value.clone()
        elif key.startswith("head."):
            state[key] = value.clone()
    # the authors' teacher keeps the text tower's embeddings; their DINO is stored too
    state["teacher_encoder.token_embedding.weight"] = model.encoder.model.token_embedding.weight.clone()
    state["dino.cls_token"] = torch.zeros(1, 1, 8)
    return state


def test_convert_pixelclip_maps_every_official_key(tmp_path):
    from ovseg.tools.weights import convert_pixelclip

    torch.manual_seed(5)
    source = PixelCLIP(clip=CLIPConfig(**TINY_KW["clip"]), **{k: v for k, v in TINY_KW.items() if k != "clip"})
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # distinguishable from a fresh random init
    official = _official_state_dict(source)
    official["sem_seg_head.predictor.something_new"] = torch.zeros(3)
    path = tmp_path / "pixelclip_vit_base.pth"
    torch.save({"model": official, "iteration": 9999}, path)

    report = convert_pixelclip(path, tmp_path / "out.ckpt", model_kwargs=TINY_KW)
    assert report["missing"] == [] and report["unexpected"] == ["sem_seg_head.predictor.something_new"]
    assert report["dropped"] == 2 and report["arch"] == "vitb16"
    ckpt = torch.load(tmp_path / "out.ckpt", weights_only=False)
    assert ckpt["global_step"] == 9999
    expected = source.state_dict()
    assert ckpt["state_dict"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(ckpt["state_dict"][key], value), key

    # a missing key is named
    del official["head.proj.weight"]
    torch.save({"model": official}, path)
    report = convert_pixelclip(path, tmp_path / "out2.ckpt", model_kwargs=TINY_KW)
    assert report["missing"] == ["head.proj.weight"]
    with pytest.raises(ValueError, match="head.proj.weight"):
        convert_pixelclip(path, tmp_path / "out3.ckpt", model_kwargs=TINY_KW, strict=True)

    # `ovseg test --ckpt_path` scores the converted checkpoint
    write_synthetic("voc20", tmp_path / "data", num_images=2, seed=1)
    main(["test", "--config", str(REPO / "configs/tiny/pixelclip.yaml"), "--data.root", str(tmp_path / "data"),
          "--ckpt_path", str(tmp_path / "out.ckpt"), "--model.init_args.results_dir", str(tmp_path / "res"),
          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"])
    results = json.loads((tmp_path / "res/results.json").read_text())
    assert results["datasets"]["voc20"]["num_images"] == 2 and results["weights"].endswith("out.ckpt")


def test_masks_sam_with_tiny_sam_writes_loadable_resumable_jsons(tmp_path):
    pytest.importorskip("segment_anything")
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    from ovseg.tools.masks import generate_masks, sam_generator

    torch.manual_seed(0)
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, out_chans=16),
        prompt_encoder=PromptEncoder(embed_dim=16, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                     mask_in_chans=4),
        mask_decoder=MaskDecoder(transformer_dim=16, transformer=TwoWayTransformer(depth=1, embedding_dim=16,
                                                                                   mlp_dim=32, num_heads=2),
                                 iou_head_hidden_dim=16),
    )
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "sub/b.png"):
        from PIL import Image

        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(images / name)
    generator = sam_generator(None, model=sam, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                              stability_score_offset=0.0, box_nms_thresh=1.0)
    counts = generate_masks(images, tmp_path / "out", generator, progress=False)
    assert counts == {"written": 2, "done": 0, "failed": 0}
    for rel in ("a", "sub/b"):
        record = json.loads((tmp_path / "out" / f"{rel}.json").read_text())
        assert record["image"]["height"] == 40 and record["image"]["width"] == 56
        assert record["annotations"], "the tiny SAM produced no masks"
        ann = record["annotations"][0]
        assert set(ann) >= {"segmentation", "area", "bbox", "predicted_iou", "stability_score"}
        mask = decode_masks([ann["segmentation"]], 40, 56)[0]
        assert int(mask.sum()) == ann["area"]
    assert len(SA1B(folder=str(tmp_path / "out"), resize_short=40, crop_size=32).build(tmp_path)) == 2
    # resumable: nothing is redone
    assert generate_masks(images, tmp_path / "out", generator, progress=False)["done"] == 2


def test_masks_dino_cli_with_tiny_random_vit(tmp_path, monkeypatch):
    from ovseg.methods.pixelclip import dino as dino_module

    original = dino_module.DinoConfig

    def tiny_config(**kwargs):
        kwargs.update(weights=None, model_kwargs=dict(depth=1, embed_dim=32, num_heads=2))
        return original(**kwargs)

    monkeypatch.setattr(dino_module, "DinoConfig", tiny_config)
    paths = write_synthetic_sa1b(tmp_path / "imgs", num_images=2, size=(48, 64))
    for p in paths:
        p.with_suffix(".json").unlink()
    main(["masks", "dino", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--clusters", "4",
          "--short-side", "64", "--no-progress", "--device", "cpu"])
    masks = load_masks(tmp_path / "out/sa_000000/sa_1.json", 48, 64)
    assert 1 <= len(masks) <= 4
    assert np.array_equal(masks.sum(0), np.ones((48, 64)))  # the clusters tile the image


def test_masks_downscale_halves_images_and_masks(tmp_path):
    paths = write_synthetic_sa1b(tmp_path / "src", num_images=2, size=(40, 60))
    main(["masks", "downscale", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "half"), "--no-progress"])
    record = json.loads((tmp_path / "half/sa_000000/sa_1.json").read_text())
    assert (record["image"]["height"], record["image"]["width"]) == (20, 30)
    original = load_masks(paths[0].with_suffix(".json"), 40, 60)
    halved = decode_masks([a["segmentation"] for a in record["annotations"]], 20, 30)
    src_record = json.loads(paths[0].with_suffix(".json").read_text())
    full = decode_masks([a["segmentation"] for a in src_record["annotations"]], 40, 60)
    assert len(halved) == len(original)
    # nearest halving of each mask == taking every other pixel (cv2 nearest at exactly 0.5)
    assert np.array_equal(halved, full[:, ::2, ::2])
    assert [a["area"] for a in record["annotations"]] == [int(m.sum()) for m in halved]
    from PIL import Image

    assert Image.open(tmp_path / "half/sa_000000/sa_1.jpg").size == (30, 20)
