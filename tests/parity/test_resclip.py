"""ResCLIP's released code vs ovseg's ResCLIP under the ``naclip`` protocol: set OVSEG_PARITY_RESCLIP to a checkout."""

from tests.parity.parity_support import assert_all_passed, reference_checkout

from ovseg.parity import resclip


def test_resclip_matches_its_released_code(tmp_path):
    records = resclip.run(reference_checkout("ResCLIP"), work_dir=tmp_path, datasets=("context60",), dense=False,
                          image_sizes={"odd 397x541": (397, 541)}, slide_labels={}, large=False)
    assert any(r.quantity.startswith("SFR attention") for r in records)
    assert any(r.quantity.startswith("labels context60") for r in records)
    assert_all_passed(records)
