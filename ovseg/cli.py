"""``ovseg``: the Lightning commands fit / validate / test / predict (:mod:`ovseg.runner`), plus a small
dispatcher for the commands that are not Trainer runs (``data``, ``masks``, ``weights``, ``bench``, ``folds``, …).

    ovseg test --config configs/tiny/maskclip.yaml --data.root data/synthetic
    ovseg predict --config configs/eval/maskclip_vitb16.yaml --images photos/ --classes "cat,dog,sky"
    ovseg data verify --root /data/ovseg
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from ovseg import __version__

__all__ = ["COMMANDS", "main"]

#: the Lightning commands, run by :func:`ovseg.runner.run_trainer` (imported only then: the other commands start
#: without Lightning)
TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")


# -- non-Trainer commands -------------------------------------------------------------------------
#: command name -> module with ``register(subparsers)`` adding its argparse parser; each parser sets
#: ``func`` to a callable taking the parsed Namespace and returning an exit code.
COMMANDS: dict[str, str] = {
    "data": "ovseg.tools.data_commands",
    "bench": "ovseg.bench.commands",
    "toyworld": "ovseg.toyworld.commands",
    "masks": "ovseg.tools.masks",
    "weights": "ovseg.tools.weights",
    "folds": "ovseg.bench.folds",
    "parity": "ovseg.parity.commands",
    "list": "ovseg.tools.listing",
    "demo": "ovseg.demo.commands",
}


def build_command_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of the non-Trainer commands; ``only``: import and register just that command (a command's module
    may import torch or more, which the others need not pay for at start-up)."""
    import importlib

    parser = argparse.ArgumentParser(prog="ovseg", description="ovseg commands that are not Trainer runs")
    parser.add_argument("--version", action="version", version=f"ovseg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(module).register(commands)
    return parser


#: what the Lightning commands do (their options: ``ovseg fit --help`` …)
TRAINER_HELP = {
    "fit": "train a method (a config from configs/; checkpoints, logs and results under --trainer.default_root_dir)",
    "validate": "score a method on the validation datasets",
    "test": "score a method and write results.json/.md (a suite of evaluations: ovseg bench run)",
    "predict": "label your own images with your own words: --images DIR --classes 'cat,dog;puppy,sky'",
}


def overview() -> str:
    """``ovseg --help``: every command, the Lightning ones and the others."""
    parser = build_command_parser()
    others = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in others._choices_actions}
    width = max(map(len, [*TRAINER_HELP, *helps])) + 2
    lines = [f"usage: ovseg COMMAND [options]   (ovseg {__version__}; ovseg COMMAND --help for a command's options)",
             "", "Lightning commands (LightningCLI: --config FILE, --key value):"]
    lines += [f"  {name:<{width}}{text}" for name, text in TRAINER_HELP.items()]
    lines += ["", "other commands:"]
    lines += [f"  {name:<{width}}{helps.get(name) or ''}" for name in COMMANDS]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> int | None:
    """Entry point. From the shell (``args`` None), user errors — a missing file, a malformed
    dataset, a bad setting — print one line naming the problem; ``OVSEG_DEBUG=1`` shows the traceback.
    Called from Python with ``args``, exceptions propagate."""
    if args is not None or os.environ.get("OVSEG_DEBUG"):
        return _main(list(sys.argv[1:] if args is None else args))
    try:
        code = _main(sys.argv[1:])
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader stopped early (`ovseg --help | head`): not an error of ours; no traceback, and nothing more to
        # flush into the closed pipe at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a writer stopped by SIGPIPE
    except (FileNotFoundError, IsADirectoryError, ValueError, KeyError) as e:  # ValueError: also DataError
        print(f"ovseg: error: {e}\n(set OVSEG_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"ovseg: error: {e.filename + ': ' if e.filename else ''}{e.strerror}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not _peer_failure(e):
            raise
        # under DDP the process that hit the problem printed it; the others only lost their connection to it
        print("ovseg: error: stopped because another process of this run failed (its error is above)",
              file=sys.stderr)
        return 1


def _peer_failure(err: RuntimeError) -> bool:
    text = str(err)
    return any(s in text for s in ("Connection closed by peer", "remote worker crashing", "Connection reset by peer",
                                   "NCCL communicator was aborted"))


def _main(argv: list[str]) -> int | None:
    if argv and argv[0] in ("--version", "-V"):
        print(f"ovseg {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return 0
    if argv and argv[0] in COMMANDS:
        ns = build_command_parser(only=argv[0]).parse_args(argv)
        return ns.func(ns) or 0
    if argv and argv[0] not in TRAINER_SUBCOMMANDS and not argv[0].startswith("-"):
        print(f"ovseg: unknown command {argv[0]!r}; use one of {', '.join(TRAINER_SUBCOMMANDS + tuple(COMMANDS))}",
              file=sys.stderr)
        return 2
    from ovseg.runner import run_trainer

    run_trainer(argv[0], argv[1:])
    return 0
