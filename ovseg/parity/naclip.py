"""NACLIP (sinahmr/NACLIP) beside ovseg's ``naclip`` protocol and :class:`ovseg.methods.NACLIP`: ``naclip.py``
``NACLIP`` with its ``configs/cfg_*.py``, PAMR off (``eval.py --pamr off``) and on (``--pamr on``: ``pamr_steps=10``,
dilations 8 and 16; ovseg's ``naclip`` protocol with ``pamr_steps: 10``), and ``pamr.py`` ``PAMR`` against
:mod:`ovseg.eval.pamr` on generated images. Variants are
chosen through NACLIP's own ``visual.set_params(arch, attn_strategy, gaussian_std)``: ``reduced``/``naclip`` = the
method (ovseg ``last_block="naclip", residual="none", ffn=False``), ``reduced``/``kk``, ``reduced``/``vanilla`` (the
last block without residual and FFN), ``vanilla``/``vanilla`` = CLIP, ``vanilla``/``csa`` = SCLIP's CSA (ovseg
``qq_kk``)."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

import ovseg.methods.naclip  # noqa: F401  (registers last_block "naclip")
from ovseg.parity.common import (
    IMAGE_SIZES,
    ParityRecord,
    generated_image,
    image_tensor,
    reference_imports,
    tensor_record,
)
from ovseg.parity.mmseg_clip import CONFIG_STEMS, Harness, Variant, run_harness

PROTOCOLS = ("naclip",)

HARNESS = Harness(
    reference="NACLIP",
    protocol="naclip",
    segmentor=("naclip", "NACLIP"),
    configs=CONFIG_STEMS,
    variants=(
        Variant("reduced/naclip", set_params=("reduced", "naclip", 5.0),
                clip={"last_block": "naclip", "residual": "none", "ffn": False}),
        Variant("reduced/kk", set_params=("reduced", "kk", 5.0),
                clip={"last_block": "kk", "residual": "none", "ffn": False}),
        Variant("reduced/vanilla", set_params=("reduced", "vanilla", 5.0),
                clip={"last_block": "vanilla", "residual": "none", "ffn": False}),
        Variant("vanilla/vanilla", set_params=("vanilla", "vanilla", 5.0),
                clip={"last_block": "vanilla", "residual": "token", "ffn": True}),
        Variant("vanilla/csa", set_params=("vanilla", "csa", 5.0),
                clip={"last_block": "qq_kk", "residual": "token", "ffn": True}),
    ),
    label_variant="reduced/naclip",
    label_datasets=("voc21", "voc20", "coco_stuff171"),
    full_text_dataset="coco_stuff171",
    # eval.py --pamr off (the default pamr_steps=10 is NACLIP's post-processed setting, compared separately)
    segmentor_kwargs={"pamr_steps": 0},
)

#: eval.py --pamr on: naclip.py NACLIP(pamr_steps=10, pamr_stride=(8, 16)); ovseg's protocol setting
PAMR_ON = {"pamr_steps": 10, "pamr_stride": (8, 16)}
PAMR_OVERRIDES = {"pamr_steps": 10, "pamr_dilations": [8, 16]}
#: label maps with PAMR: VOC21 (whole image, synonyms, threshold) and Cityscapes (slide, short side 560). Their PAMR
#: holds [queries, 16, H, W] floats twice: VOC21's 55 queries at 2048x1024 would need ~15 GB, so VOC21 runs on the
#: other sizes and Cityscapes (19 queries, ~6 GB) on all of them.
PAMR_LABELS = {"voc21": {k: v for k, v in IMAGE_SIZES.items() if max(v) < 2048}, "cityscapes": IMAGE_SIZES}


def pamr_records(ref_dir: Path, device: str) -> list[ParityRecord]:
    """Their ``pamr.PAMR`` against :class:`ovseg.eval.pamr.PAMR` on generated images (normalised with CLIP's
    mean/std as NACLIP's model input) and random scores, 10 steps, dilations 8 and 16."""
    from ovseg.eval.pamr import PAMR

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    records = []
    with reference_imports(ref_dir):
        theirs_pamr = importlib.import_module("pamr").PAMR(10, dilations=(8, 16)).to(device)
        for size_name, (h, w) in {"voc 375x500": (375, 500), "odd 397x541": (397, 541),
                                  "cityscapes 512x1024": (512, 1024)}.items():
            image = ((image_tensor(generated_image(h, w, seed=3 * h + w))[None] - mean) / std).to(device)
            torch.manual_seed(h + w)
            scores = torch.nn.functional.interpolate(torch.randn(1, 8, h // 16, w // 16), size=(h, w), mode="bilinear")
            scores = scores.to(device)
            with torch.no_grad():
                theirs = theirs_pamr(image, scores)
                ours = PAMR(image, 10, (8, 16))(scores)
            records.append(tensor_record("NACLIP", f"PAMR output {size_name}", ours, theirs, protocol="naclip",
                                         detail="pamr.py PAMR(10, dilations=(8, 16)) vs ovseg.eval.pamr.PAMR; 8 "
                                                "channels of upsampled random scores, generated image, fp32"))
    return records


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), **kwargs) -> list[ParityRecord]:
    records = run_harness(HARNESS, ref_dir, device, work_dir, **kwargs)
    records += pamr_records(ref_dir, device)
    for dataset, sizes in PAMR_LABELS.items():
        if kwargs.get("datasets") and dataset not in kwargs["datasets"]:
            continue
        records += run_harness(HARNESS, ref_dir, device, work_dir, datasets=(dataset,),
                               image_sizes=kwargs.get("image_sizes") or sizes, full_text=False, dense=False,
                               inputs=False, segmentor_kwargs=PAMR_ON, overrides=PAMR_OVERRIDES, label="labels PAMR")
    return records
