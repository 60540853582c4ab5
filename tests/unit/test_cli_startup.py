"""Commands that are not Trainer runs start without importing torch, Lightning or torchmetrics (~6 CPU-s)."""

import subprocess
import sys

import pytest

from ovseg.cli import COMMANDS

HEAVY = ("torch", "lightning", "torchmetrics", "transformers", "open_clip")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_help_imports_no_framework(command):
    code = ("import sys\nfrom ovseg.cli import main\n"
            f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
