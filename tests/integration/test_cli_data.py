"""`ovseg data synth | verify | convert` through the command dispatcher."""

import numpy as np
from PIL import Image

from ovseg.cli import main
from ovseg.data.seg_dataset import SegFileDataset


def test_synth_then_verify(tmp_path, capsys):
    assert main(["data", "synth", "--root", str(tmp_path), "--datasets", "voc21,ade150,cityscapes",
                 "--num-images", "3"]) == 0
    # synthetic sets are far smaller than the official splits: found, but incomplete -> exit 1
    rc = main(["data", "verify", "--root", str(tmp_path), "--datasets", "voc21,ade150,cityscapes,context60"])
    out = capsys.readouterr().out.splitlines()
    lines = {line.split()[0]: line for line in out if line.strip()}
    assert rc == 1
    assert "INCOMPLETE" in lines["voc21"] and "3/1449" in lines["voc21"] and "(+255 ignore)" in lines["voc21"]
    assert "3/2000" in lines["ade150"] and "3/500" in lines["cityscapes"]
    assert "MISSING" in lines["context60"] and "JPEGImages" in lines["context60"]


def test_verify_reports_bad_label_values(tmp_path, capsys):
    main(["data", "synth", "--root", str(tmp_path), "--datasets", "cityscapes", "--num-images", "2"])
    path = SegFileDataset("cityscapes", tmp_path).samples[1][2]
    label = np.asarray(Image.open(path)).copy()
    label[0, 0] = 40
    Image.fromarray(label).save(path)
    assert main(["data", "verify", "--root", str(tmp_path), "--datasets", "cityscapes"]) == 1
    line = capsys.readouterr().out
    assert "BAD" in line and path.name in line and "[40]" in line


def test_convert_commands_are_registered(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["data", "convert", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for name in ("pascal_context", "voc_aug", "coco_stuff", "coco_object", "cityscapes"):
        assert name in help_text
