"""EXIF orientation per protocol (issue 29): the references' readers turn a tagged JPEG (mmcv's cv2 reader,
detectron2's ``read_image``), ovseg does where the protocol says ``exif_orientation: apply``; ``ovseg data verify``
counts tagged images."""

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ovseg.data.files import EXIF_ORIENTATION, DataError, apply_exif_orientation, exif_orientation
from ovseg.data.seg_dataset import SegFileDataset
from ovseg.data.synthetic import write_synthetic
from ovseg.data.verify import verify_dataset
from ovseg.eval.evaluator import Evaluator
from ovseg.eval.protocols import load_protocol


class PixelMethod(torch.nn.Module):
    """Scores from a fixed random projection of the pixels (so turning the image changes the prediction)."""

    input_size = 32

    def __init__(self):
        super().__init__()
        self.projection = torch.randn(3, 21, generator=torch.Generator().manual_seed(0))

    def encode_text(self, names, templates):
        return torch.eye(len(names))

    def dense_logits(self, images, text):
        return torch.einsum("bchw,cq->bqhw", images, self.projection[:, : text.shape[0]])


def _tagged(image: np.ndarray, orientation: int, fmt: str = "PNG") -> bytes:
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    pil.save(buffer, fmt, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_what_pil_shows(orientation):
    image = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(_tagged(image, orientation)))))
    chw = np.moveaxis(image, -1, 0)
    np.testing.assert_array_equal(np.moveaxis(apply_exif_orientation(chw, orientation), 0, -1), shown)
    turned = apply_exif_orientation(torch.from_numpy(chw), orientation)
    np.testing.assert_array_equal(turned.permute(1, 2, 0).numpy(), shown)


def test_the_references_cv2_reader_turns_a_tagged_jpeg():
    data = _tagged(np.zeros((60, 100, 3), np.uint8), 6, "JPEG")
    # mmcv.imfrombytes(flag='color', backend='cv2') is cv2.imdecode(IMREAD_COLOR); labels are read 'unchanged'
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (100, 60, 3)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).shape == (60, 100, 3)
    assert np.asarray(Image.open(io.BytesIO(data))).shape == (60, 100, 3)  # PIL alone: as stored


@pytest.fixture
def tagged_voc(tmp_path):
    """Synthetic VOC with image 0 tagged 180° (same shape) and image 1 tagged 90° (its label no longer fits)."""
    write_synthetic("voc21", tmp_path, num_images=3, size=(40, 56), seed=0)
    dataset = SegFileDataset("voc21", tmp_path)
    for index, orientation in ((0, 3), (1, 6)):
        path = dataset.samples[index][1]
        path.write_bytes(_tagged(np.asarray(Image.open(path).convert("RGB")), orientation, "JPEG"))
    return tmp_path


def test_verify_counts_tagged_images(tagged_voc):
    report = verify_dataset("voc21", tagged_voc)
    assert report.exif_tagged == 2 and not report.problems
    assert "2 with an EXIF orientation tag" in report.line()


def test_evaluator_applies_the_tag_only_where_the_protocol_says(tagged_voc):
    dataset = SegFileDataset("voc21", tagged_voc)
    assert [dataset[i]["meta"]["exif_orientation"] for i in range(3)] == [3, 6, 1]
    assert exif_orientation(dataset.samples[2][1]) == 1
    sample = dataset[0]
    image, label = sample["image"].float() / 255, sample["label"]
    settings = {"short_side": 32, "templates": "single"}

    def confusion(protocol, images, orientations):
        method = PixelMethod()
        evaluator = Evaluator(load_protocol(protocol), settings)
        entry = evaluator.add_dataset(method, "voc21", None, 0, torch.device("cpu"))
        evaluator.update(method, "voc21", images, [label], ["x"], orientations)
        return entry.metric.confmat.clone()

    assert load_protocol("maskclip").settings_for("voc21").exif_orientation == "apply"
    assert load_protocol("toyworld").settings_for("voc21").exif_orientation == "ignore"
    turned = torch.rot90(image, 2, (-2, -1))
    # apply: scored as the image turned by hand; ignore: as stored
    assert torch.equal(confusion("maskclip", [image], [3]), confusion("maskclip", [turned], [1]))
    assert torch.equal(confusion("toyworld", [image], [3]), confusion("toyworld", [image], [1]))
    assert not torch.equal(confusion("maskclip", [image], [3]), confusion("maskclip", [image], [1]))

    sample = dataset[1]
    evaluator = Evaluator(load_protocol("maskclip"), settings)
    evaluator.add_dataset(PixelMethod(), "voc21", None, 0, torch.device("cpu"))
    with pytest.raises(DataError, match=r"voc21 .*: EXIF orientation 6 turns the image"):
        evaluator.update(PixelMethod(), "voc21", [sample["image"].float() / 255], [sample["label"]],
                         [sample["meta"]["id"]], [6])
