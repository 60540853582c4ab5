"""Parity tests run the authors' code beside ovseg; they need a checkout named by ``OVSEG_PARITY_<REF>``."""

import os
import re
from pathlib import Path

import pytest

from ovseg.parity import REPOSITORIES


def reference_checkout(name: str) -> Path:
    """The checkout of reference ``name`` from ``OVSEG_PARITY_<NAME>`` (``SC-CLIP``: ``OVSEG_PARITY_SC_CLIP``), or
    skip saying how to get one."""
    variable = "OVSEG_PARITY_" + re.sub(r"\W", "_", name.upper())
    folder = os.environ.get(variable)
    if not folder or not Path(folder).is_dir():
        pytest.skip(f"no {name} checkout: git clone {REPOSITORIES[name]} and set {variable} to its folder")
    return Path(folder)


def assert_all_passed(records) -> None:
    failed = [f"{r.quantity}: {r.max_rel_diff if r.max_rel_diff is not None else r.identical_share} ({r.detail})"
              for r in records if not r.passed]
    assert records and not failed, "\n".join(failed)
