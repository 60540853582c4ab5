"""``ovseg parity --ref MaskCLIP=/src/MaskCLIP [--ref SCLIP=/src/SCLIP …] --out benchmarks``."""

from __future__ import annotations

import argparse
import importlib
import platform
from pathlib import Path

from ovseg.parity import REFERENCES, REPOSITORIES


#: the references whose comparison takes ``--weights`` / ``--images``
TRAINED_WEIGHTS = ("MaskCLIP", "PixelCLIP")


def _parse_ref(value: str) -> tuple[str, Path]:
    name, sep, folder = value.partition("=")
    if not sep or not folder:
        raise argparse.ArgumentTypeError(f"--ref takes NAME=DIR, got {value!r}")
    if name not in REFERENCES:
        raise argparse.ArgumentTypeError(f"unknown reference {name!r}; known: {', '.join(REFERENCES)}")
    return name, Path(folder).expanduser()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "parity",
        help="compare ovseg with the authors' code on the same weights (random by default); writes PARITY.md / "
        "parity.json",
        description="Runs each reference checkout's unmodified files beside ovseg (same random weights, generated "
        "images; or --weights / --images) and writes PARITY.md and parity.json into --out (the committed record: "
        "--out benchmarks). Needs the [parity] extra. Peak memory on the CPU: PixelCLIP up to 15.4 GB, MaskCLIP "
        "about 4 GB. Get a checkout with `git clone` of: "
        + "; ".join(f"{k}: {v}" for k, v in REPOSITORIES.items()),
    )
    parser.add_argument("--ref", action="append", type=_parse_ref, required=True, metavar="NAME=DIR",
                        help=f"a reference checkout ({', '.join(REFERENCES)}); repeat for several")
    parser.add_argument("--out", default="outputs/parity",
                        help="folder of PARITY.md and parity.json (the committed record: --out benchmarks)")
    parser.add_argument("--device", default="cpu", help="torch device for both sides (default cpu)")
    parser.add_argument("--work-dir", default="outputs/parity", help="random weights and scratch files")
    parser.add_argument("--weights", type=Path, default=None, metavar="FILE",
                        help="trained OpenAI CLIP weights (OpenAI's ViT-B-16.pt or a state dict) for both sides "
                             f"instead of random ones, labels with the protocol's full template set "
                             f"({', '.join(TRAINED_WEIGHTS)})")
    parser.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help=f"real images (a folder or one file) for the label maps instead of generated ones "
                             f"({', '.join(TRAINED_WEIGHTS)})")
    parser.set_defaults(func=run)


#: import name -> PyPI name of what the references import that ovseg itself does not: the ``[parity]`` extra
PARITY_EXTRA_MODULES: dict[str, str] = {"ftfy": "ftfy", "regex": "regex", "einops": "einops", "clip": "openai-clip",
                                        "mmengine": "mmengine", "mmcv": "mmcv-lite", "addict": "addict", "yapf": "yapf"}


def missing_parity_modules() -> list[str]:
    """PyPI names of the ``[parity]`` extra's packages that do not import here (found without importing them)."""
    import importlib.util

    return [package for module, package in PARITY_EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]


def check_requirements(references: list[str]) -> None:
    """Before any work: one line naming what to install (the ``[parity]`` extra; mmcv 1.x for MaskCLIP)."""
    missing = missing_parity_modules()
    if missing:
        raise SystemExit(f"ovseg parity needs the [parity] extra (missing: {', '.join(missing)}): "
                         "pip install -e '.[parity]' -c requirements/constraints.txt")
    if "MaskCLIP" in references:
        from ovseg.parity.maskclip import MMCV1_INSTALL, mmcv1_dir

        if not (mmcv1_dir() / "mmcv" / "__init__.py").is_file():
            raise SystemExit(f"MaskCLIP parity needs mmcv 1.x in {mmcv1_dir()} (or set OVSEG_MMCV1_DIR): "
                             + MMCV1_INSTALL.format(dir=mmcv1_dir()))


def run(ns: argparse.Namespace) -> int:
    for name, ref_dir in ns.ref:
        if not ref_dir.is_dir():
            raise SystemExit(f"--ref {name}={ref_dir}: no such folder (git clone {REPOSITORIES[name]})")
    # the arguments first (cheap, and wrong whatever is installed), then the environment
    trained = {k: v for k, v in (("weights", ns.weights), ("images", ns.images)) if v is not None}
    unsupported = [name for name, _ in ns.ref if name not in TRAINED_WEIGHTS]
    if trained and unsupported:
        raise SystemExit(f"--{'/--'.join(trained)}: not supported for {', '.join(unsupported)} yet (only "
                         f"{', '.join(TRAINED_WEIGHTS)}); run those without it")
    check_requirements([name for name, _ in ns.ref])
    if ns.weights is not None and not ns.weights.is_file():
        raise SystemExit(f"--weights {ns.weights}: no such file")
    if ns.images is not None and not ns.images.exists():
        raise SystemExit(f"--images {ns.images}: no such file or folder")

    from ovseg.parity.common import git_commit
    import torch

    from ovseg.parity.report import update_parity

    # parity compares float32 arithmetic at 1e-5; TF32 tensor cores (cuDNN convolutions use them by default) round
    # to a 10-bit mantissa and differ by algorithm choice (SAM's patch embedding: 1.2e-4 on an H200 with them on)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failed = []
    for name, ref_dir in ns.ref:
        module = importlib.import_module(REFERENCES[name])
        records = module.run(ref_dir.resolve(), device=ns.device, work_dir=Path(ns.work_dir).resolve(), **trained)
        environment = {"torch": torch.__version__, "device": ns.device, "machine": platform.machine(),
                       "weights": f"trained ({ns.weights.name})" if ns.weights else "random",
                       "images": str(ns.images) if ns.images else "generated"}
        update_parity(ns.out, name, git_commit(ref_dir), list(module.PROTOCOLS), records, environment)
        for r in records:
            value = (f"max rel diff {r.max_rel_diff:.2e}" if r.max_rel_diff is not None
                     else f"identical {100 * r.identical_share:.4f} %" if r.identical_share is not None
                     else r.detail)
            print(f"[{name}] {'ok  ' if r.passed else 'FAIL'} {r.quantity} ({r.protocol or '-'}): {value}")
        if not all(r.passed for r in records):
            failed.append(name)
    print(f"wrote {Path(ns.out) / 'PARITY.md'}" + (f"; not passed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
