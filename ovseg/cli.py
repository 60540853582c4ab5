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
import warnings

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
#: command name -> module with ``register(subparsers)`` adding its argparse parser; each parser sets
#: ``func`` to a callable taking the parsed Namespace and returning an exit code.
COMMANDS: dict[str, str] = {
    "data": "ovseg.tools.data_commands",
    "bench": "ovseg.bench.commands",
    "toyworld": "ovseg.toyworld.commands",
    "masks": "ovseg.tools.masks",
    "weights": "ovseg.tools.weights",
    "folds": "ovseg.eval.folds_report",
    "parity": "ovseg.parity.commands",
}


def build_command_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="ovseg", description="ovseg commands that are not Trainer runs")
    parser.add_argument("--version", action="version", version=f"ovseg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).register(commands)
    return parser


def main(args: list[str] | None = None) -> int | None:
    """Entry point. From the shell (``args`` None), user errors — a missing file, a malformed
    dataset, a bad setting — print one line naming the problem; ``OVSEG_DEBUG=1`` shows the traceback.
    Called from Python with ``args``, exceptions propagate."""
    if args is not None or os.environ.get("OVSEG_DEBUG"):
        return _main(list(sys.argv[1:] if args is None else args))
    from ovseg.data.seg_dataset import DataError

    try:
        return _main(sys.argv[1:])
    except (DataError, FileNotFoundError, IsADirectoryError, ValueError, KeyError) as e:
        print(f"ovseg: error: {e}\n(set OVSEG_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def _main(argv: list[str]) -> int | None:
    if argv and argv[0] in ("--version", "-V"):
        print(f"ovseg {__version__}")
        return 0
    if argv and argv[0] in COMMANDS:
        ns = build_command_parser().parse_args(argv)
        return ns.func(ns) or 0
    if argv and argv[0] not in TRAINER_SUBCOMMANDS and not argv[0].startswith("-"):
        print(f"ovseg: unknown command {argv[0]!r}; use one of {', '.join(TRAINER_SUBCOMMANDS + tuple(COMMANDS))}",
              file=sys.stderr)
        return 2
    if argv[:1] == ["test"]:  # `ovseg test --config benchmarks/suites/<suite>.yaml`: run the whole suite
        from ovseg.bench.commands import run_suite_argv

        rc = run_suite_argv(argv[1:])
        if rc is not None:
            return rc
    # main() passes the (alias-expanded) argv explicitly; Lightning warns when sys.argv is also set
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    OVSegCLI(args=_expand_aliases(argv))
    return 0
