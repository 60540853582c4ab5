"""``ovseg weights convert-pixelclip``: the authors' released detectron2 checkpoints -> ovseg checkpoints.

    ovseg weights convert-pixelclip pixelclip_vit_base.pth pixelclip_vitb16.ckpt
    ovseg test --config configs/eval/pixelclip_vitb16.yaml --ckpt_path pixelclip_vitb16.ckpt

Key mapping (the authors' ``PixelCLIP`` module -> ovseg's ``PixelCLIP``):

==========================================================  =======================================
official                                                    ovseg
==========================================================  =======================================
``sem_seg_head.predictor.clip_model.visual.*``              ``encoder.model.visual.*`` (student)
``sem_seg_head.predictor.clip_model.<text tower>``          ``encoder.model.<text tower>``
``sem_seg_head.predictor.prompt_tokens``                    ``prompts.tokens``
``teacher_encoder.visual.*``                                ``teacher.model.visual.*``
``head.*`` (ConvHead)                                       ``head.*``
``teacher_encoder.<text tower>``, ``dino.*``                dropped (unused copies / mask generator)
==========================================================  =======================================

Missing and unexpected keys are reported by name; with ``--strict`` any missing key is an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where a checkpoint is read or written: `ovseg weights --help` starts without torch
    import torch

__all__ = ["convert_pixelclip", "map_official_key", "ARCHS", "register"]

STUDENT = "sem_seg_head.predictor.clip_model."
PROMPTS = "sem_seg_head.predictor.prompt_tokens"
TEACHER = "teacher_encoder."
DROPPED_PREFIXES = ("dino.",)

#: architecture presets: PixelCLIP settings the released checkpoints were trained with
ARCHS: dict[str, dict[str, Any]] = {
    "vitb16": dict(clip=dict(name="ViT-B-16", pretrained=None, last_block="value", residual="cls", ffn=True,
                             quick_gelu=True), clip_resolution=320),
    "convnextb": dict(clip=dict(name="convnext_base_w_320", pretrained=None), clip_resolution=640),
}


def map_official_key(key: str) -> str | None:
    """The ovseg name of an official key, or None for keys that are dropped on purpose."""
    if key == PROMPTS:
        return "prompts.tokens"
    if key.startswith(STUDENT):
        return "encoder.model." + key[len(STUDENT):]
    if key.startswith(TEACHER):
        rest = key[len(TEACHER):]
        return "teacher.model." + rest if rest.startswith("visual.") else None
    if key.startswith("head."):
        return key
    if key.startswith(DROPPED_PREFIXES):
        return None
    return key  # unknown: reported as unexpected


def _load_official(path: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    import torch

    from ovseg.utils.io import load_weights_file

    path = Path(path)
    # the file users download from others: tensors, numbers and numpy values only, never the general unpickler
    ckpt = load_weights_file(path, "PixelCLIP checkpoint", allow_numpy=True)
    state = ckpt.get("model", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: no state dict found (expected a detectron2 checkpoint with 'model')")
    iteration = int(ckpt.get("iteration", 0)) if isinstance(ckpt, dict) else 0
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, iteration


def detect_arch(state: dict[str, torch.Tensor]) -> str:
    return "convnextb" if any(k.startswith(STUDENT + "visual.trunk.") for k in state) else "vitb16"


def convert_pixelclip(official: str | Path, out: str | Path, arch: str | None = None,
                      model_kwargs: dict[str, Any] | None = None, strict: bool = False) -> dict[str, Any]:
    """Convert; returns a report: ``missing`` (ovseg keys not in the file), ``unexpected`` (file keys with no
    ovseg counterpart), ``dropped`` (file keys left out on purpose), ``mismatched`` (shape differences)."""
    from lightning import __version__ as lightning_version

    from ovseg.methods.pixelclip import PixelCLIP
    from ovseg.models.clip import CLIPConfig
    from ovseg.utils.io import atomic_open

    state, iteration = _load_official(official)
    arch = arch or detect_arch(state)
    if model_kwargs is None:
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; one of {sorted(ARCHS)}")
        model_kwargs = ARCHS[arch]
    kwargs = dict(model_kwargs)
    clip_cfg = dict(kwargs.pop("clip"))
    model = PixelCLIP(clip=CLIPConfig(**clip_cfg), **kwargs)
    target = model.state_dict()

    converted, unexpected, dropped, mismatched = {}, [], [], []
    for key, value in state.items():
        new = map_official_key(key)
        if new is None:
            dropped.append(key)
        elif new not in target:
            unexpected.append(key)
        elif tuple(value.shape) != tuple(target[new].shape):
            mismatched.append(f"{key}: {tuple(value.shape)} vs ovseg {new}: {tuple(target[new].shape)}")
        else:
            converted[new] = value.to(target[new].dtype)
    missing = sorted(k for k in target if k not in converted)
    report = {"arch": arch, "converted": len(converted), "missing": missing, "unexpected": sorted(unexpected),
              "dropped": len(dropped), "mismatched": mismatched}
    if mismatched or (strict and missing):
        raise ValueError(f"{official}: cannot convert: mismatched {mismatched}, missing {missing}")
    model.load_state_dict(converted, strict=False)
    hparams = {"_class_path": "ovseg.methods.PixelCLIP", "clip": clip_cfg, **kwargs}
    checkpoint = {"state_dict": model.state_dict(), "pytorch-lightning_version": lightning_version,
                  "hyper_parameters": hparams, "epoch": 0, "global_step": iteration,
                  "ovseg_converted_from": str(Path(official).resolve())}
    import torch

    with atomic_open(out, "wb") as f:
        torch.save(checkpoint, f)
    return report


def _convert(ns: argparse.Namespace) -> int:
    report = convert_pixelclip(ns.official, ns.out, ns.arch, strict=ns.strict)
    print(f"{ns.out}: {report['converted']} tensors converted ({report['arch']}), {report['dropped']} dropped "
          f"(teacher text tower, DINO)")
    for name in ("missing", "unexpected"):
        keys = report[name]
        print(f"  {name}: {len(keys)}" + "".join(f"\n    {k}" for k in keys))
    return 1 if report["missing"] and ns.strict else 0


def register(commands) -> None:
    weights = commands.add_parser("weights", help="checkpoint converters")
    sub = weights.add_subparsers(dest="weights_command", required=True)
    conv = sub.add_parser("convert-pixelclip", help="authors' detectron2 PixelCLIP checkpoint -> ovseg checkpoint")
    conv.add_argument("official", help="pixelclip_vit_base(_dino).pth / pixelclip_convnext_base(_dino).pth")
    conv.add_argument("out", help="output .ckpt for `ovseg test --ckpt_path`")
    conv.add_argument("--arch", choices=sorted(ARCHS), default=None, help="default: detected from the keys")
    conv.add_argument("--strict", action="store_true", help="fail when an ovseg key is missing from the file")
    conv.set_defaults(func=_convert)
