"""ClearCLIP's released code vs ovseg's ClearCLIP last block and ``clearclip`` protocol: set OVSEG_PARITY_CLEARCLIP
to a checkout."""

import sys

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import clearclip


def test_clearclip_dense_features_and_protocol_match_the_authors_code(tmp_path):
    installed = sys.modules["open_clip"] if "open_clip" in sys.modules else None
    records = clearclip.run(reference_checkout("ClearCLIP"), work_dir=tmp_path, datasets=("voc21", "cityscapes"),
                            image_sizes={"odd 397x541": (397, 541)})
    dense = [r for r in records if r.quantity.startswith("dense tokens")]
    assert {r.quantity.split()[2] for r in dense} == {"ClearCLIP", "SCLIP", "vanilla"}
    assert {r.quantity for r in records if r.quantity.startswith("labels")} == {
        "labels voc21 odd 397x541", "labels cityscapes odd 397x541"}
    assert {"text embeddings voc21", "text embeddings cityscapes", "model input odd 397x541"} <= {
        r.quantity for r in records}
    assert_all_passed(records)
    assert installed is None or sys.modules["open_clip"] is installed  # their vendored copy was set aside again
