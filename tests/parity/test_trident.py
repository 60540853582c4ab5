"""Trident's released code vs ovseg's Trident under the ``trident`` protocol: set OVSEG_PARITY_TRIDENT to a checkout
(and a facebookresearch/dino checkout beside it, or OVSEG_PARITY_DINO)."""

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import trident


def test_trident_matches_its_released_code(tmp_path):
    # one VOC-sized image: SAM ViT-B at 1024 runs once per side on the CPU (the full run adds four sizes, Cityscapes'
    # two SAM halves among them)
    records = trident.run(reference_checkout("Trident"), work_dir=tmp_path,
                          cases={"voc 375x500": ((375, 500), "voc21")}, dense_cases=("voc 375x500",),
                          refinement=False)
    assert {r.quantity.split(" voc")[0] for r in records} == {"SAM affinity", "spliced window tokens", "logits",
                                                             "label map"}
    assert_all_passed(records)


def test_trident_sam_refinement_matches_its_released_code():
    # their seg_utils/utils.py sam_refinement vs ovseg's on hand-made probabilities (random SAM prompt side)
    records = trident.RecordLog()
    trident.refinement_rows(reference_checkout("Trident"), records)
    assert len(records) == 2 * len(trident.REFINEMENT_CASES)
    assert_all_passed(records)
