"""NACLIP (sinahmr/NACLIP) beside ovseg's ``naclip`` protocol: ``naclip.py`` ``NACLIP`` with its
``configs/cfg_*.py`` and PAMR off (``eval.py --pamr off``; ovseg has no PAMR). ovseg has no NACLIP attention
yet, so the NACLIP pipeline is compared with the attention variants ovseg has, chosen through NACLIP's own
``visual.set_params(arch, attn_strategy, gaussian_std)``: ``vanilla``/``vanilla`` = CLIP, ``vanilla``/``csa`` =
SCLIP's CSA (ovseg ``qq_kk``), ``reduced``/``vanilla`` = the last block without residual and FFN (ovseg
``residual="none", ffn=False``)."""

from __future__ import annotations

from pathlib import Path

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
        Variant("reduced/vanilla", set_params=("reduced", "vanilla", 5.0),
                clip={"last_block": "vanilla", "residual": "none", "ffn": False}),
        Variant("vanilla/vanilla", set_params=("vanilla", "vanilla", 5.0),
                clip={"last_block": "vanilla", "residual": "token", "ffn": True}),
        Variant("vanilla/csa", set_params=("vanilla", "csa", 5.0),
                clip={"last_block": "qq_kk", "residual": "token", "ffn": True}),
    ),
    label_variant="reduced/vanilla",
    label_datasets=("voc21", "voc20", "coco_stuff171"),
    full_text_dataset="coco_stuff171",
    # eval.py --pamr off (the default pamr_steps=10 is NACLIP's post-processed setting; ovseg has no PAMR)
    segmentor_kwargs={"pamr_steps": 0},
)


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), **kwargs) -> list[ParityRecord]:
    return run_harness(HARNESS, ref_dir, device, work_dir, **kwargs)
