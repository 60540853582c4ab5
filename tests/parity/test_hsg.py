"""HSG's SegSort pieces vs the segments and pixel losses of CLIP-S4 / the SegSort baseline: set OVSEG_PARITY_HSG to a
checkout."""

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import hsg


def test_segments_and_pixel_losses_match_hsg(tmp_path):
    records = hsg.run(reference_checkout("HSG"), work_dir=tmp_path)
    assert {r.quantity for r in records if r.quantity.startswith("pixel loss")} == {
        "pixel loss group_mode=segsort+", "pixel loss group_mode=segsort"}
    assert sum(r.quantity.startswith("segments") for r in records) == len(hsg.SEGMENT_CASES)
    assert_all_passed(records)
