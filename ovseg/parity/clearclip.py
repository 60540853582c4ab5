"""ClearCLIP (mc-lan/ClearCLIP) beside :class:`ovseg.methods.ClearCLIP`: the dense image features of the authors'
vendored open_clip (``open_clip/transformer.py`` ``VisionTransformer.forward(x, model_type, ignore_residual)`` with
``custom_attn``) against ovseg's last block with ``last_block="qq", residual="none", ffn=False``, on the same random
ViT-B/16 weights, for ``model_type`` ClearCLIP (and vanilla / SCLIP / MaskCLIP through the same switch).

Their checkout ships its own ``open_clip`` package under the same name as the installed one: it is imported while
ovseg's is set aside, and forgotten afterwards. Their segmentation pipeline (short side 448, 448/224 windows, logit
scale 50, the model in fp16) is not an ovseg protocol yet, so only the dense features are compared here; both sides
run fp32 on the CPU with fp16-exact weights (as the SCLIP/NACLIP comparisons).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from ovseg.parity.common import ParityRecord, generated_image, reference_imports, tensor_record
from ovseg.parity.mmseg_clip import DENSE_SIZES, fp16_exact_clip

PROTOCOLS: tuple[str, ...] = ()  # dense features of the method only, under no ovseg protocol
#: their model_type -> ovseg CLIPConfig fields (their ignore_residual=True: the last block is its attention alone)
VARIANTS = {
    "ClearCLIP": {"last_block": "qq", "residual": "none", "ffn": False},
    "SCLIP": {"last_block": "qq_kk", "residual": "none", "ffn": False},
    "vanilla": {"last_block": "vanilla", "residual": "none", "ffn": False},
}


@contextlib.contextmanager
def their_open_clip(ref_dir: Path) -> Iterator[object]:
    """The checkout's ``open_clip`` package, with the installed one set aside meanwhile and put back after."""
    ours = {name: module for name, module in sys.modules.items()
            if name == "open_clip" or name.startswith("open_clip.")}
    for name in ours:
        del sys.modules[name]
    try:
        with reference_imports(ref_dir):
            theirs = importlib.import_module("open_clip")
            if not str(getattr(theirs, "__file__", "")).startswith(str(Path(ref_dir).resolve())):
                raise RuntimeError(f"{ref_dir}: no vendored open_clip package (is this a ClearCLIP checkout?)")
            yield theirs
    finally:
        for name in [n for n in sys.modules if n == "open_clip" or n.startswith("open_clip.")]:
            del sys.modules[name]
        sys.modules.update(ours)


def run(ref_dir: Path, device: str = "cpu", work_dir: Path = Path("outputs/parity"), **kwargs) -> list[ParityRecord]:
    from ovseg.eval.evaluator import dense_options
    from ovseg.eval.protocols import load_protocol
    from ovseg.methods.zeroshot import ZeroShotCLIP
    from ovseg.models.clip import CLIPConfig

    started = time.time()
    folder = fp16_exact_clip(Path(work_dir), small_text=True)
    model_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    state = torch.load(folder / "open_clip_pytorch_model.bin", map_location="cpu", weights_only=True)
    # their interpolate_pos_encoding is SCLIP's (bicubic, scale ((H // 16) + 0.1) / 14): the sclip protocol's option
    settings = load_protocol("sclip").settings_for(None)
    records = []
    with their_open_clip(ref_dir) as theirs:
        reference = theirs.model.CLIP(**model_cfg).eval().to(device)
        missing, unexpected = reference.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"their CLIP does not take the weights: missing {missing}, unexpected {unexpected}")
        for model_type, clip in VARIANTS.items():
            method = ZeroShotCLIP(CLIPConfig(name=f"local-dir:{folder}", pretrained=None, quick_gelu=True, **clip))
            method = method.to(device).eval()
            for size_name, (h, w) in DENSE_SIZES.items():
                image = torch.from_numpy(generated_image(h, w, seed=h + w)).permute(2, 0, 1)[None].float() / 255
                x = method.encoder.normalize(image.to(device))
                with torch.no_grad(), dense_options(method, settings):
                    ours = method.encoder.encode_tokens(x)[:, 1:]  # their forward returns the patch tokens
                    reference_tokens = reference.visual(x, model_type, ignore_residual=True)
                records.append(tensor_record(
                    "ClearCLIP", f"dense tokens {model_type} {size_name}", ours, reference_tokens,
                    detail=f"patch tokens after ln_post/proj, fp32 CPU; their visual(x, {model_type!r}, "
                           f"ignore_residual=True); ovseg CLIPConfig({', '.join(f'{k}={v}' for k, v in clip.items())})"
                           f", pos_embed_interpolation={settings.pos_embed_interpolation}"))
    print(f"[ClearCLIP] compared in {time.time() - started:.0f} s", flush=True)
    return records
