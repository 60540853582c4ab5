"""The one way ovseg runs a Lightning command (``fit`` / ``validate`` / ``test`` / ``predict``): the LightningCLI
subclass and :func:`run_trainer`, which runs it in this process or, ``isolate``-d, as ``python -m ovseg``.

``ovseg fit|test …`` on the shell, ``ovseg bench run`` (each suite part), ``ovseg folds run`` (each fold) and the
toy-world leaderboard (each stage) all go through :func:`run_trainer`; nothing else builds a Trainer from
arguments.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

# Importing albumentations otherwise asks PyPI for a newer version on every start.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from lightning.pytorch.cli import LightningCLI  # noqa: E402



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


#: ``ovseg predict --images DIR --classes "a,b"`` -> the DataModule's predict arguments
PREDICT_ALIASES = {"--images": "--data.predict_images", "--classes": "--data.predict_classes"}


def expand_aliases(command: str, args: list[str]) -> list[str]:
    if command != "predict":
        return list(args)
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        out.append(PREDICT_ALIASES[key] + sep + value if key in PREDICT_ALIASES else arg)
    return out


def run_trainer(command: str, args: list[str], isolate: bool = False) -> None:
    """``ovseg <command> <args>``: in this process (exceptions propagate), or as a subprocess (``isolate``: DDP
    runs, which re-launch the interpreter on every rank), raising when it fails."""
    if command not in OVSegCLI.subcommands():
        raise ValueError(f"unknown Lightning command {command!r}; one of {', '.join(OVSegCLI.subcommands())}")
    if isolate:
        proc = subprocess.run([sys.executable, "-m", "ovseg", command, *args])
        if proc.returncode != 0:
            raise RuntimeError(f"ovseg {command} exited with status {proc.returncode}")
        return
    # the arguments are passed explicitly; Lightning warns when sys.argv is also set
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    try:
        OVSegCLI(args=[command, *expand_aliases(command, args)])
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()  # runs in one process must not share one wandb run
