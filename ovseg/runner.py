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
from pathlib import Path
from typing import Any

# Importing albumentations otherwise asks PyPI for a newer version on every start.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402


def _silence_known_harmless_noise() -> None:
    """Third-party messages every run printed that say nothing about it, each filtered by its own text and origin
    (every other warning stays): Lightning 2.6 builds torch pytree ``LeafSpec`` objects, which torch 2.14
    deprecates; the "module(s) in eval mode" warning is the frozen CLIP, frozen on purpose; the litlogger /
    litmodels tips are advertisements. And each Lightning line once: open_clip logs through the root logger, which
    installs a root handler; Lightning imported after that propagated every line to it too, printing it twice."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training",
                            category=PossibleUserWarning)
    import logging

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡 Tip: For seamless cloud"))
    lightning_logger = logging.getLogger("lightning")
    if lightning_logger.handlers:  # Lightning's own console handler prints its lines; the root's need not again
        lightning_logger.propagate = False


_silence_known_harmless_noise()

#: the default logger's ``save_dir``: replaced by ``trainer.default_root_dir`` before the Trainer is built, so
#: ``--trainer.default_root_dir DIR`` moves logs, checkpoints, results and pictures (an explicit ``save_dir`` wins)
DEFAULT_ROOT_DIR = "<trainer.default_root_dir>"


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml``, written atomically into the run's own folder (with wandb, Lightning's
    default is the logger's ``save_dir``, which every run shares and overwrites). A run without a logger
    (``--trainer.logger false``) has no folder of its own and writes none: it rewrote ``<default_root_dir>/config.yaml``
    (``outputs/config.yaml`` in the checkout) on every run."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved or trainer.logger is None:
            return
        if trainer.is_global_zero:
            from ovseg.eval.session import run_dir
            from ovseg.utils.io import atomic_write_text

            atomic_write_text(run_dir(trainer) / self.config_filename,
                              self.parser.dump(self.config, skip_none=False))
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class OVSegArgumentParser(LightningArgumentParser):
    """Errors in one or two lines: the problem (a bad YAML file named) and where to look, not ~60 lines of usage."""

    #: the arguments being parsed (set by :class:`OVSegCLI`), to name a config file that is not valid YAML
    current_args: list[str] = []

    def print_usage(self, file=None) -> None:
        prog = self.prog.replace(" [options]", "")
        (file or sys.stderr).write(f"usage: {prog} [--config FILE] [--key value ...]\n")

    def error(self, message: str, ex: Exception | None = None):
        if "Problems parsing config" in message:
            message = _invalid_yaml(self.current_args) or message
        super().error(message, ex)


def _invalid_yaml(args: list[str]) -> str | None:
    """``FILE: not valid YAML: …`` for the first ``--config`` file that does not parse, else None."""
    import yaml

    from ovseg.utils.cli_args import config_arguments

    for path, _ in config_arguments(args):
        if Path(path).is_file():
            try:
                yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
                return f"{where}: not valid YAML: {getattr(err, 'problem', None) or err}"
    return None


class OVSegCLI(LightningCLI):
    """LightningCLI in subclass mode: ``model: {class_path: MaskCLIP, init_args: ...}``."""

    def __init__(self, args: list[str] | None = None, run: bool = True):
        OVSegArgumentParser.current_args = list(sys.argv[1:] if args is None else args)
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
            parser_class=OVSegArgumentParser,
            save_config_callback=SaveRunConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                # exact distributed evaluation: our loaders shard without repeating samples
                "use_distributed_sampler": False,
                "default_root_dir": "outputs",
                "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": DEFAULT_ROOT_DIR}},
            },
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"data": {"class_path": "ovseg.data.datamodule.OVSegDataModule"}})

    def _parse_ckpt_path(self) -> None:
        # Lightning re-applies a checkpoint's hyper-parameters, its model class included, over the config: a
        # checkpoint of another method would silently be what gets scored. Refuse that, and name unreadable files.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path == "last":
            # Lightning looks for "last" only in this run's own (new, empty) checkpoint folder and then trains from
            # scratch with a warning; a user means the newest last.ckpt of the runs in the run folder
            from ovseg.utils.checkpoints import find_last_checkpoint

            ckpt_path = self.config[subcommand].ckpt_path = str(find_last_checkpoint(run_root(self.config[subcommand])))
        if ckpt_path:
            model = self.config[subcommand].model
            check_checkpoint_method(ckpt_path, model.class_path)
            check_checkpoint_shapes(ckpt_path, model.as_dict() if hasattr(model, "as_dict") else dict(model))
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any):
        from ovseg.utils.checkpoints import use_atomic_checkpoints

        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        claim_run_folders(trainer)
        return trainer

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # jsonargparse reports a constructor's own error (an unknown last_block or protocol, naming the valid
            # choices) inside a multi-line "Does not validate against any of the Union subtypes" listing
            raise constructor_error(err) from err

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = config.trainer
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in loggers:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and getattr(init_args, "save_dir", None) == DEFAULT_ROOT_DIR:
                init_args.save_dir = trainer.default_root_dir or "outputs"


def claim_run_folders(trainer) -> None:
    """Give each versioned file logger (CSV, TensorBoard) without an explicit version a ``version_N`` folder created
    now, atomically (:func:`~ovseg.utils.io.claim_version_folder`): two runs started together into one
    ``default_root_dir`` shared ``version_0`` (interleaved metrics, overwritten checkpoints). Rank 0 only: the
    other processes of a run neither log nor pick folders (checkpoint folders come from rank 0)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from ovseg.utils.io import claim_version_folder

    if rank_zero_only.rank != 0:
        return
    for logger in trainer.loggers:
        if getattr(logger, "_version", "given") is None and hasattr(logger, "_get_next_version"):
            logger._version = claim_version_folder(logger.root_dir, logger._get_next_version())


def run_root(config) -> str:
    """Where a command's runs land: the logger's ``save_dir`` (``trainer.default_root_dir`` unless the logger names
    its own), else ``trainer.default_root_dir``."""
    trainer = config.trainer
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for logger in loggers:
        save_dir = getattr(getattr(logger, "init_args", None), "save_dir", None)
        if save_dir and save_dir != DEFAULT_ROOT_DIR:
            return str(save_dir)
    return trainer.default_root_dir or "outputs"


class _ParseOnly(OVSegCLI):
    """Parses a command line as :class:`OVSegCLI` does; reads no checkpoint, seeds, builds and runs nothing."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        return super().init_parser(**kwargs, exit_on_error=False)

    def _parse_ckpt_path(self) -> None:
        pass

    def _set_seed(self) -> None:
        pass

    def _add_instantiators(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse_command(command: str, args: list[str]) -> dict[str, Any]:
    """The settings ``ovseg <command> <args>`` runs with, as LightningCLI reads them (config files, their fragments,
    the classes' defaults, the command line), as plain data; a line that does not parse raises ValueError."""
    from jsonargparse import ArgumentError

    try:
        cli = _ParseOnly(args=[command, *expand_aliases(command, args)])
    except ArgumentError as err:
        raise ValueError(str(err).strip()) from err
    return cli.config[command].as_dict()


#: how jsonargparse words a value that fits none of an argument's types; the constructor's own error is its cause
_UNION_ERROR = "Does not validate against any of the Union subtypes"


def constructor_error(err: ValueError) -> ValueError:
    """The error a constructor raised, unwrapped from jsonargparse's union-type report; ``err`` itself otherwise."""
    while str(err).startswith(_UNION_ERROR) and isinstance(err.__cause__, ValueError):
        err = err.__cause__
    return err


def read_checkpoint_hparams(path: str | Path) -> dict:
    """A Lightning checkpoint's ``hyper_parameters`` (memory-mapped: the weights are not read). A missing, truncated
    or foreign file raises an error naming it."""
    from ovseg.utils.io import load_weights_file

    path = Path(path).expanduser()
    checkpoint = load_weights_file(path, "checkpoint", mmap=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return dict(checkpoint.get("hyper_parameters") or {})


def _class_name(class_path: str) -> str:
    """``ovseg.methods.MaskCLIP`` and ``ovseg.methods.zeroshot.MaskCLIP`` name the same class: compare the class
    objects when both import, else the last component."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return f"{cls.__module__}.{cls.__qualname__}"
    except (ImportError, AttributeError, ValueError):
        return name


def check_checkpoint_method(path: str | Path, config_class_path: str) -> None:
    """Raise when the checkpoint at ``path`` was written by another method class than the config's model."""
    written_by = read_checkpoint_hparams(path).get("_class_path")
    if written_by and config_class_path and _class_name(written_by) != _class_name(config_class_path):
        raise ValueError(f"{path} is a checkpoint of {written_by.rpartition('.')[2]} ({written_by}), but the config's "
                         f"model is {config_class_path.rpartition('.')[2]}: use that method's config")


#: model settings (canonical keys, ``init_args`` left out) that decide the shapes of a method's weights: a checkpoint
#: whose values differ from the config's was trained as another model (LightningCLI would silently build the
#: checkpoint's and score it under the config's protocol)
SHAPE_SETTINGS = ("clip.name", "backbone.class_path", "backbone.head_dim", "num_unknown", "num_clusters")


def check_checkpoint_shapes(path: str | Path, model_config: dict[str, Any]) -> None:
    """Raise naming both when the checkpoint at ``path`` and the config's model (``{class_path, init_args}``)
    differ in a :data:`SHAPE_SETTINGS` value both set."""
    from ovseg.utils.cli_args import flatten

    def same(key: str, a: Any, b: Any) -> bool:  # a class may be spelled by its package or its module
        return _class_name(a) == _class_name(b) if key.endswith("class_path") else a == b

    written = flatten(read_checkpoint_hparams(path))
    wanted = flatten(model_config)
    differ = [key for key in SHAPE_SETTINGS if written.get(key) is not None and wanted.get(key) is not None
              and not same(key, written[key], wanted[key])]
    if differ:
        raise ValueError(f"{path} is a checkpoint of another model than the config's: "
                         f"{', '.join(f'{k}={written[k]}' for k in differ)} in the checkpoint, "
                         f"{', '.join(f'{k}={wanted[k]}' for k in differ)} in the config; use the config it was "
                         f"trained with")


class _BuildOnly(OVSegCLI):
    """Builds what ``ovseg predict <args>`` builds (config files, the checkpoint's hyper-parameters and checks, the
    method, the Trainer) and runs nothing."""

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def load_predict_method(args: list[str]) -> tuple[Any, Any, str | None]:
    """The method ``ovseg predict <args>`` would run (``--config FILE [--ckpt_path CKPT] [--key value …]``), built
    the same way, its checkpoint's weights loaded as Lightning's predict loads them, on its Trainer's device, in
    eval mode: load once, predict many (``ovseg demo``). Returns (method, trainer, checkpoint path or None); the
    Trainer says the device and holds the precision plugin whose ``predict_step_context`` predictions run in."""
    args = [*expand_aliases("predict", args), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    cli = _BuildOnly(args=["predict", *args])
    method, trainer = cli.model, cli.trainer
    ckpt_path = cli.config.predict.get("ckpt_path")
    if ckpt_path:
        checkpoint = trainer.strategy.load_checkpoint(ckpt_path)  # the reader of trainer.predict(ckpt_path=…)
        method.on_load_checkpoint(checkpoint)  # Lightning's restore_model: the hook, then the weights
        method.load_state_dict(checkpoint["state_dict"], strict=method.strict_loading)
    method.to(trainer.strategy.root_device).eval()
    return method, trainer, ckpt_path


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
