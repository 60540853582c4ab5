"""NACLIP (sinahmr/NACLIP) beside ovseg's ``naclip`` protocol and :class:`ovseg.methods.NACLIP`: ``naclip.py``
``NACLIP`` with its ``configs/cfg_*.py`` and PAMR off (``eval.py --pamr off``; ovseg has no PAMR). Variants are
chosen through NACLIP's own ``visual.set_params(arch, attn_strategy, gaussian_std)``: ``reduced``/``naclip`` = the
method (ovseg ``last_block="naclip", residual="none", ffn=False``), ``reduced``/``kk``, ``reduced``/``vanilla`` (the
last block without residual and FFN), ``vanilla``/``vanilla`` = CLIP, ``vanilla``/``csa`` = SCLIP's CSA (ovseg
``qq_kk``)."""

from __future__ import annotations

from pathlib import Path

import ovseg.methods.naclip  # noqa: F401  (registers last_block "naclip")
from ovseg.parity.common import ParityRecord
from ovseg.parity.mmseg_clip import Harness, Variant, run_harness

PROTOCOLS = ("naclip",)

HARNESS = Harness(
    reference="NACLIP",
    protocol="naclip",
    segmentor=("naclip", "NACLIP"),
    configs={"voc21": "voc21", "voc20": "voc20", "context60": "context60", "context59": "context59",
             "coco_object": "coco_object", "coco_stuff171": "coco_stuff164k", "cityscapes": "city_scapes",
             "ade150": "ade20k"},
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
    # eval.py --pamr off (the default pamr_steps=10 is NACLIP's post-processed setting; ovseg has no PAMR)
    segmentor_kwargs={"pamr_steps": 0},
)


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), **kwargs) -> list[ParityRecord]:
    return run_harness(HARNESS, ref_dir, device, work_dir, **kwargs)
