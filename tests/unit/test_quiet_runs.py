"""A clean run prints what matters (issue 26 §6): known-harmless third-party messages are filtered at their source
by their own text, every other warning stays, and each Lightning line is printed once."""

import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_known_harmless_warnings_are_filtered_and_others_kept():
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    from ovseg.runner import _silence_known_harmless_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # not pytest's own filters: every warning, then ovseg's in front
        _silence_known_harmless_noise()
        warnings.warn_explicit("Found 154 module(s) in eval mode at the start of training. This may lead to ...",
                               PossibleUserWarning, "fit_loop.py", 1, module="lightning.pytorch.loops.fit_loop")
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
                               "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit("The dataloader does not have many workers", PossibleUserWarning, "x.py", 2,
                               module="lightning.pytorch.trainer.connectors.data_connector")
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
                               "mine.py", 3, module="mypackage.mine")  # the same text from elsewhere: kept
    assert [str(w.message)[:30] for w in caught] == ["The dataloader does not have m", "`isinstance(treespec, LeafSpec"]


QUIET_CHECK = """
import logging
logging.warning("open_clip-style root message")  # installs a root handler, as open_clip's logging calls do
import ovseg.runner
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.fabric.utilities.seed import seed_everything
seed_everything(3)
rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...)")
"""


def test_each_lightning_line_is_printed_once_and_tips_are_not():
    proc = subprocess.run([sys.executable, "-c", QUIET_CHECK], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Seed set to 3") == 1, proc.stderr
    assert "Tip:" not in proc.stderr and "open_clip-style root message" in proc.stderr


def test_a_reader_that_stops_early_is_no_traceback():
    """``ovseg --help | head -1``: the pipe closes before ovseg has written everything."""
    proc = subprocess.Popen([sys.executable, "-m", "ovseg", "--help"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    proc.stdout.close()  # no reader: the first write fails with EPIPE
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and stderr == "", stderr
