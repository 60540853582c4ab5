"""``ovseg``: LightningCLI for fit / validate / test / predict, plus a small dispatcher for the
commands that are not Trainer runs (``data``; later ``masks``, ``weights``, ``bench``).

    ovseg test --config configs/tiny/maskclip.yaml --data.root data/synthetic
    ovseg predict --config configs/eval/maskclip_vitb16.yaml --images photos/ --classes "cat,dog,sky"
    ovseg data verify --root /data/ovseg
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

# Importing albumentations otherwise asks PyPI for a newer version on every start.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from ovseg import __version__  # noqa: E402

TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class OVSegCLI(LightningCLI):
    """LightningCLI in subclass mode: ``model: {class_path: MaskCLIP, init_args: ...}``."""

    def __init__(self, args: list[str] | None = None, run: bool = True):
        import ovseg.data.datamodule  # noqa: F401  (short class names resolve once imported)
        import ovseg.methods  # noqa: F401
        from ovseg.data.datamodule import OVSegDataModule
        from ovseg.methods.base import OVSegMethod

        super().__init__(
            model_class=OVSegMethod,
            datamodule_class=OVSegDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                # exact distributed evaluation: our loaders shard without repeating samples
                "use_distributed_sampler": False,
                "default_root_dir": "outputs",
                "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "outputs"}},
            },
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"data": {"class_path": "ovseg.data.datamodule.OVSegDataModule"}})


# -- argv sugar -----------------------------------------------------------------------------------
_PREDICT_ALIASES = {"--images": "--data.predict_images", "--classes": "--data.predict_classes"}


def _expand_aliases(argv: list[str]) -> list[str]:
    """``ovseg predict --images DIR --classes "a,b"`` -> the DataModule's predict arguments."""
    if not argv or argv[0] != "predict":
        return argv
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        out.append(_PREDICT_ALIASES.get(key, key) + sep + value if key in _PREDICT_ALIASES else arg)
    return out


# -- non-Trainer commands -------------------------------------------------------------------------
def _data_verify(ns: argparse.Namespace) -> int:
    from ovseg.data.specs import BENCHMARKS
    from ovseg.data.verify import verify_dataset

    names = ns.datasets.split(",") if ns.datasets else list(BENCHMARKS)
    reports = [verify_dataset(n, ns.root, ns.split, check_labels=not ns.quick, progress=ns.progress) for n in names]
    for r in reports:
        print(r.line())
        for p in r.problems[1:] if ns.verbose else []:
            print(f"    {p}")
    return 0 if all(r.complete for r in reports if r.found) and any(r.found for r in reports) else 1


def _data_synth(ns: argparse.Namespace) -> int:
    from ovseg.data.synthetic import write_synthetic

    for name in ns.datasets.split(","):
        ids = write_synthetic(name, ns.root, ns.split, ns.num_images, (ns.min_size, ns.max_size), ns.seed)
        print(f"{name}: wrote {len(ids)} images under {ns.root}")
    return 0


def build_command_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovseg", description="ovseg commands that are not Trainer runs")
    parser.add_argument("--version", action="version", version=f"ovseg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="dataset layouts: verify, convert, synth").add_subparsers(
        dest="data_command", required=True
    )
    verify = data.add_parser("verify", help="check file counts and label values of each dataset under a root")
    verify.add_argument("--root", required=True)
    verify.add_argument("--datasets", default=None, help="comma-separated names (default: all benchmarks)")
    verify.add_argument("--split", default="val")
    verify.add_argument("--quick", action="store_true", help="count files only, do not read labels")
    verify.add_argument("--progress", action="store_true")
    verify.add_argument("--verbose", "-v", action="store_true")
    verify.set_defaults(func=_data_verify)

    synth = data.add_parser("synth", help="write tiny synthetic datasets in the real on-disk layouts")
    synth.add_argument("--root", required=True)
    synth.add_argument("--datasets", default="voc21")
    synth.add_argument("--split", default="val")
    synth.add_argument("--num-images", type=int, default=5)
    synth.add_argument("--min-size", type=int, default=48)
    synth.add_argument("--max-size", type=int, default=96)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_data_synth)

    convert = data.add_parser("convert", help="turn official downloads into the mmsegmentation layouts")
    from ovseg.tools.convert import register_all

    register_all(convert.add_subparsers(dest="converter", required=True))
    return parser


COMMANDS: dict[str, Callable[[], argparse.ArgumentParser]] = {"data": build_command_parser}


def main(args: list[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ("--version", "-V"):
        print(f"ovseg {__version__}")
        return 0
    if argv and argv[0] in COMMANDS:
        ns = COMMANDS[argv[0]]().parse_args(argv)
        return ns.func(ns)
    if argv and argv[0] not in TRAINER_SUBCOMMANDS and not argv[0].startswith("-"):
        print(f"ovseg: unknown command {argv[0]!r}; use one of {', '.join(TRAINER_SUBCOMMANDS + tuple(COMMANDS))}",
              file=sys.stderr)
        return 2
    OVSegCLI(args=_expand_aliases(argv))
    return 0
