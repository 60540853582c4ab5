"""SCLIP (wangf3014/SCLIP) beside ovseg's ``sclip`` protocol: ``clip_segmentor.py`` ``CLIPForSegmentation`` with
its ``configs/cfg_*.py``, and ovseg's CSA model (``last_block="qq_kk"``, token residual, FFN: SCLIP's
``clip/model.py`` ``VisionTransformer.forward`` keeps ``x + custom_attn(...)`` and ``x + mlp(ln_2(x))``)."""

from __future__ import annotations

from pathlib import Path

from ovseg.parity.common import ParityRecord
from ovseg.parity.mmseg_clip import CONFIG_STEMS, Harness, Variant, run_harness

PROTOCOLS = ("sclip",)

HARNESS = Harness(
    reference="SCLIP",
    protocol="sclip",
    segmentor=("clip_segmentor", "CLIPForSegmentation"),
    configs=CONFIG_STEMS,
    variants=(
        Variant("csa", encode_kwargs={"csa": True}, clip={"last_block": "qq_kk", "residual": "token", "ffn": True}),
        Variant("vanilla", encode_kwargs={"csa": False},
                clip={"last_block": "vanilla", "residual": "token", "ffn": True}),
    ),
    label_variant="csa",
    label_datasets=("voc21", "context60", "coco_object", "cityscapes"),
    full_text_dataset="cityscapes",
)


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), **kwargs) -> list[ParityRecord]:
    return run_harness(HARNESS, ref_dir, device, work_dir, **kwargs)
