"""Reading a LightningCLI command line without parsing it."""

from __future__ import annotations


def config_arguments(args: list[str]) -> list[tuple[str, list[str]]]:
    """Each ``--config FILE`` / ``-c FILE`` / ``--config=FILE`` of ``args``, in order, with the arguments that remain
    without it."""
    found = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            found.append((args[i + 1], args[:i] + args[i + 2:]))
        elif arg.startswith("--config="):
            found.append((arg.split("=", 1)[1], args[:i] + args[i + 1:]))
    return found
