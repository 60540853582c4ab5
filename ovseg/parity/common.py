"""What every reference comparison shares: records and their statistics, random CLIP weights in the OpenAI
layout (what the references load), generated images of benchmark-like sizes, importing a reference checkout
with stand-in modules, and ovseg's own side (a method scored by the shared evaluator under a protocol)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import types
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

#: the issue's bars: dense features / logits / text, label maps, a training step
FEATURE_TOLERANCE = 1e-5
LABEL_AGREEMENT = 0.9999
TRAINING_TOLERANCE = 1e-4

#: generated image sizes (height, width): VOC-, Context-, ADE-, COCO-, Cityscapes-shaped, and odd ones whose
#: sides are not multiples of 16 after any protocol's resize
IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "voc 375x500": (375, 500),
    "context 333x500": (333, 500),
    "ade 512x683": (512, 683),
    "coco 480x640": (480, 640),
    "cityscapes 1024x2048": (1024, 2048),
    "odd 397x541": (397, 541),
}


@dataclass
class ParityRecord:
    """One compared quantity. ``max_rel_diff`` = max |ours − reference| / max |reference| (tensors);
    ``identical_share`` = share of pixels with the same label (label maps); ``text_precision``: the class
    embeddings' precision on each side where text enters the quantity (``"ovseg fp16, reference fp16"``)."""

    reference: str
    quantity: str
    protocol: str | None = None
    max_rel_diff: float | None = None
    identical_share: float | None = None
    tolerance: float | None = None
    passed: bool = False
    detail: str = ""
    text_precision: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RecordLog(list):
    """A run's records; calling it with a record keeps it and prints one progress line (seconds since ``started``,
    the value, ok / FAIL), so a long CPU run shows where it is."""

    def __init__(self, started: float | None = None):
        super().__init__()
        self.started = time.time() if started is None else started

    def __call__(self, record: "ParityRecord") -> None:
        self.append(record)
        value = (f"{record.max_rel_diff:.2e}" if record.max_rel_diff is not None
                 else f"{100 * record.identical_share:.4f} %" if record.identical_share is not None else "")
        print(f"  [{time.time() - self.started:6.1f}s] {record.quantity}: {value} {'ok' if record.passed else 'FAIL'}",
              flush=True)


def max_rel_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    ours, reference = torch.as_tensor(ours).double().cpu(), torch.as_tensor(reference).double().cpu()
    if ours.shape != reference.shape:
        raise ValueError(f"shapes differ: ours {tuple(ours.shape)}, reference {tuple(reference.shape)}")
    scale = reference.abs().max().item()
    return (ours - reference).abs().max().item() / (scale if scale > 0 else 1.0)


def tensor_record(reference: str, quantity: str, ours: torch.Tensor, theirs: torch.Tensor, *,
                  protocol: str | None = None, tolerance: float = FEATURE_TOLERANCE, detail: str = "",
                  text_precision: str | None = None) -> ParityRecord:
    diff = max_rel_diff(ours, theirs)
    return ParityRecord(reference, quantity, protocol, max_rel_diff=diff, tolerance=tolerance,
                        passed=diff <= tolerance, detail=detail, text_precision=text_precision)


def state_dict_record(reference: str, quantity: str, protocol: str, theirs: dict[str, torch.Tensor],
                      ours: dict[str, torch.Tensor]) -> ParityRecord:
    """Two state dicts equal tensor for tensor under the same keys (a hub model against what timm loads from its
    weights file); the unmatched keys, if any, named in the detail."""
    unmatched = sorted(set(theirs) ^ set(ours))
    worst = max((float((ours[k].float() - v.float()).abs().max()) for k, v in theirs.items()
                 if k in ours and ours[k].shape == v.shape), default=float("inf"))
    same = not unmatched and worst == 0.0
    return ParityRecord(reference, quantity, protocol, max_rel_diff=0.0 if same else float("inf"), tolerance=0.0,
                        passed=same, detail=f"{len(theirs)} tensors loaded by timm's loader (VFMConfig.weights=<.pth>)"
                        + (f"; unmatched keys {unmatched[:4]}" if unmatched else ", equal, same keys"))


def label_record(reference: str, quantity: str, ours: np.ndarray | torch.Tensor, theirs: np.ndarray | torch.Tensor,
                 *, protocol: str | None = None, agreement: float = LABEL_AGREEMENT, detail: str = "",
                 text_precision: str | None = None) -> ParityRecord:
    ours, theirs = np.asarray(torch.as_tensor(ours).cpu()), np.asarray(torch.as_tensor(theirs).cpu())
    if ours.shape != theirs.shape:
        raise ValueError(f"{quantity}: label maps differ in shape: ours {ours.shape}, reference {theirs.shape}")
    share = float((ours == theirs).mean())
    return ParityRecord(reference, quantity, protocol, identical_share=share, tolerance=agreement,
                        passed=share >= agreement, detail=detail, text_precision=text_precision)


# -- inputs ---------------------------------------------------------------------------------------------------
def random_openai_clip(path: Path, model_name: str = "ViT-B-16", seed: int = 0) -> Path:
    """Random CLIP weights saved as an OpenAI-layout state dict (open_clip's CLIP uses OpenAI's parameter names),
    so ovseg (open_clip, QuickGELU) and the references' own ``clip`` packages load the same numbers."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=True)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
    return path


#: entries of OpenAI's TorchScript state dict that are not weights (its ``build_model`` deletes them)
OPENAI_JIT_SCALARS = ("input_resolution", "context_length", "vocab_size")


def trained_openai_clip(source: Path, work_dir: Path) -> Path:
    """User-given CLIP weights (``ovseg parity --weights``) as a plain OpenAI-layout state dict under ``work_dir``:
    OpenAI's released file (a TorchScript archive, e.g. ``ViT-B-16.pt``) or a state dict (``state_dict`` /
    ``model`` wrappers unpacked). Both sides then load the same file."""
    source = Path(source).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"--weights {source}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; OpenAI's files are archives
            state = torch.jit.load(str(source), map_location="cpu").state_dict()
    except RuntimeError:
        state = torch.load(source, map_location="cpu", weights_only=False)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or "visual.conv1.weight" not in state or "token_embedding.weight" not in state:
        raise ValueError(f"--weights {source}: not OpenAI-layout CLIP weights (no visual.conv1.weight / "
                         "token_embedding.weight)")
    state = {k: v.detach().clone() for k, v in state.items() if k not in OPENAI_JIT_SCALARS}
    path = Path(work_dir) / f"trained-{source.stem}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def real_images(folder: Path) -> dict[str, np.ndarray]:
    """``ovseg parity --images``: the images of a folder (or one file), named by file, RGB uint8 as stored."""
    from ovseg.data.seg_dataset import ImageFolderDataset
    from ovseg.data.files import read_image

    dataset = ImageFolderDataset(folder)
    return {f"image {file_id}": read_image(path) for file_id, path in zip(dataset.ids, dataset.paths)}


def generated_image(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 ``[H,W,3]`` image with smooth colour regions, edges and noise: resizing it exercises
    interpolation and rounding the way a photograph does (a flat image would hide differences)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(12):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(0.05, 0.4) * max(height, width)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < radius**2
        image[blob] = rng.uniform(0, 255, 3)
    image += 40 * np.sin(xx / rng.uniform(5, 40))[..., None] * rng.uniform(-1, 1, 3)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H,W,3]`` -> float ``[3,H,W]`` in [0,1], as ovseg's data layer delivers it."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


# -- references -----------------------------------------------------------------------------------------------
def git_commit(ref_dir: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(ref_dir), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stub_module(name: str, **attributes: Any) -> types.ModuleType:
    """A stand-in module (and its parent packages) holding ``attributes``."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    module.__path__ = []  # a package, so submodules can be stubbed under it
    return module


def pkg_resources_stand_in() -> types.ModuleType:
    """OpenAI's ``clip/clip.py`` (and the copies in SCLIP, NACLIP) runs ``from pkg_resources import packaging``;
    setuptools >= 81 has no ``pkg_resources``."""
    import packaging.version

    assert packaging.version  # loaded, so clip's ``packaging.version.parse`` resolves
    return stub_module("pkg_resources", packaging=sys.modules["packaging"])


@contextlib.contextmanager
def reference_imports(ref_dir: Path, stubs: dict[str, types.ModuleType] | None = None) -> Iterator[None]:
    """Import from a reference checkout (``ref_dir`` first on ``sys.path``) with ``stubs`` standing in for the
    frameworks it imports; afterwards every module loaded from the checkout, and the stubs, are forgotten (two
    references may both have a top-level ``clip`` package)."""
    ref_dir = Path(ref_dir).resolve()
    if not ref_dir.is_dir():
        raise FileNotFoundError(f"reference checkout not found: {ref_dir}")
    before = set(sys.modules)
    saved = {name: sys.modules[name] for name in (stubs or {}) if name in sys.modules}
    sys.modules.update(stubs or {})
    sys.path.insert(0, str(ref_dir))
    try:
        yield
    finally:
        sys.path.remove(str(ref_dir))
        for name in list(sys.modules):
            module = sys.modules[name]
            origin = getattr(module, "__file__", None) or ""
            if name in (stubs or {}) or (name not in before and origin.startswith(str(ref_dir))):
                del sys.modules[name]
        sys.modules.update(saved)


# -- ovseg's side ---------------------------------------------------------------------------------------------
class OVSegScorer:
    """ovseg's label maps for uint8 images, scored exactly as ``ovseg test`` scores them: the shared evaluator
    under ``protocol`` (its class names, templates, resize, inference mode, thresholds). Text embeddings are
    encoded once per dataset."""

    def __init__(self, method, protocol: str, overrides: dict[str, Any] | None = None, device: str = "cpu"):
        from ovseg.eval.evaluator import Evaluator
        from ovseg.eval.protocols import load_protocol

        self.method = method.to(device).eval()
        self.device = torch.device(device)
        self.evaluator = Evaluator(load_protocol(protocol), overrides)

    def entry(self, dataset: str):
        from ovseg.data.specs import get_spec

        if dataset not in self.evaluator.datasets:
            spec = get_spec(dataset)
            self.evaluator.add_dataset(self.method, dataset, spec.class_names, spec.background_index, self.device)
        return self.evaluator.datasets[dataset]

    def labels(self, dataset: str, image: np.ndarray) -> torch.Tensor:
        entry = self.entry(dataset)
        return self.evaluator.predict(self.method, entry, image_tensor(image).to(self.device), image.shape[:2]).cpu()
