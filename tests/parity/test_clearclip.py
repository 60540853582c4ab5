"""ClearCLIP's released code vs ovseg's ClearCLIP last block: set OVSEG_PARITY_CLEARCLIP to a checkout."""

import sys

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import clearclip


def test_clearclip_dense_features_match_the_authors_last_block(tmp_path):
    installed = sys.modules["open_clip"] if "open_clip" in sys.modules else None
    records = clearclip.run(reference_checkout("ClearCLIP"), work_dir=tmp_path)
    assert {r.quantity.split()[2] for r in records} == {"ClearCLIP", "SCLIP", "vanilla"}
    assert_all_passed(records)
    assert installed is None or sys.modules["open_clip"] is installed  # their vendored copy was set aside again
