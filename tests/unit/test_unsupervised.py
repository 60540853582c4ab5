"""k-NN and linear-probe evaluation on constructed embeddings: separable -> near-perfect, shuffled -> chance."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg.eval.metrics import scores_from_confusion
from ovseg.methods.probes import _segments, fit_linear_probe, knn_votes, segment_bank

C = 4  # classes


def _sample(seed, size=32):
    """An image whose red channel encodes the class of each pixel (blocks), and its label."""
    rng = np.random.default_rng(seed)
    label = np.kron(rng.integers(0, C, (4, 4)), np.ones((size // 4, size // 4), dtype=np.int64))
    label[0, :3] = 255  # some ignored pixels
    image = np.zeros((3, size, size), dtype=np.uint8)
    image[0] = np.where(label == 255, 0, label) * 60 + 10
    image[1] = rng.integers(0, 255, (size, size))  # clutter the embedder ignores
    return {"image": torch.from_numpy(image), "label": torch.from_numpy(label)}


def separable_embed(images01):
    """[B,3,H,W] -> [B,D,H/4,W/4]: one direction per class (+ noise), read from the red channel."""
    cls = ((images01[:, 0] * 255 - 10) / 60).round().clamp(0, C - 1).long()
    cls = cls[:, 2::4, 2::4]
    emb = F.one_hot(cls, 8).permute(0, 3, 1, 2).float()
    emb = emb + 0.05 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
    return F.normalize(emb, dim=1)


def _confusion(predict, samples):
    cm = np.zeros((C, C), dtype=np.int64)
    for s in samples:
        pred = predict(s["image"].float()[None] / 255)
        pred = F.interpolate(pred[None, None].float(), size=s["label"].shape, mode="nearest")[0, 0].long()
        keep = s["label"] != 255
        np.add.at(cm, (s["label"][keep].numpy(), pred[keep].numpy()), 1)
    return cm


def _knn_predict(bank, labels):
    def predict(images01):
        emb = separable_embed(images01)[0]
        assign, segments = _segments(emb, 12, 10)
        return knn_votes(segments, bank, labels, C, k=5).argmax(1)[assign]
    return predict


def test_knn_separable_near_perfect_and_shuffled_at_chance():
    train = [_sample(i) for i in range(6)]
    test = [_sample(100 + i) for i in range(4)]
    bank, labels = segment_bank(separable_embed, train, C, num_segments=12, iterations=10)
    assert bank.shape[0] == labels.shape[0] > 0 and labels.min() >= 0
    good = scores_from_confusion(_confusion(_knn_predict(bank, labels), test))
    assert good.mIoU > 95 and good.pAcc > 97
    rng = torch.Generator().manual_seed(1)
    shuffled_labels = torch.randint(0, C, labels.shape, generator=rng)
    bad = scores_from_confusion(_confusion(_knn_predict(bank, shuffled_labels), test))
    assert bad.mIoU < 40 and bad.pAcc < 50  # chance: IoU ~ 1/7, pAcc ~ 1/4


@pytest.mark.parametrize("shuffle", [False, True])
def test_linear_probe_separable_near_perfect_and_shuffled_at_chance(shuffle):
    train = [_sample(i) for i in range(6)]
    if shuffle:  # labels unrelated to the embeddings
        g = torch.Generator().manual_seed(2)
        train = [{"image": s["image"], "label": torch.where(s["label"] == 255, s["label"],
                                                            torch.randint(0, C, s["label"].shape, generator=g))}
                 for s in train]
    weight, bias = fit_linear_probe(separable_embed, train, C, dim=8, iterations=60, lr=0.5, crop=32, batch_size=4,
                                    short_side=None)
    test = [_sample(100 + i) for i in range(4)]

    def predict(images01):
        emb = separable_embed(images01)
        return (torch.einsum("bdhw,cd->bchw", emb, weight) + bias[None, :, None, None])[0].argmax(0)

    scores = scores_from_confusion(_confusion(predict, test))
    if shuffle:
        assert scores.mIoU < 40
    else:
        assert scores.mIoU > 95


@pytest.mark.parametrize("probe", ["knn", "linear"])
def test_probes_run_through_ovseg_test(tmp_path, probe):
    import json
    from pathlib import Path

    from ovseg.cli import main
    from ovseg.data.synthetic import write_synthetic

    root = tmp_path / "data"
    # same ids/seed: the val images are also the (labelled) training images
    write_synthetic("voc_aug", root, split="trainaug", num_images=2, seed=5)
    write_synthetic("voc21", root, split="val", num_images=2, seed=5)
    config = str(Path(__file__).resolve().parents[2] / f"configs/tiny/clips4_{probe}.yaml")
    out = tmp_path / "res"
    main(["test", "--config", config, "--data.root", str(root), "--model.init_args.results_dir", str(out),
          "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    voc = results["datasets"]["voc21"]
    assert results["method"] == {"knn": "KNNProbe", "linear": "LinearProbe"}[probe]
    assert len(voc["per_class"]) == 21 and voc["mIoU"] is not None
    cm = np.array(voc["confusion_matrix"])
    assert cm.sum() > 0 and cm.shape == (21, 21)


@pytest.mark.parametrize("resolution", ["input", "embedding"])
def test_knn_probe_clusters_at_the_input_resolution_with_one_label_per_segment(resolution):
    """HSG's evaluation: embeddings resized to the image, k-means there, each segment one label (the majority of its
    neighbours' labels, recomputed here with numpy); ``embedding`` keeps the stride grid and soft vote counts."""
    from ovseg.methods.probes import KNNProbe

    train = [_sample(i) for i in range(6)]
    bank, labels = segment_bank(separable_embed, train, C, num_segments=12, iterations=10,
                                at_input=resolution == "input")
    probe = torch.nn.Module.__new__(KNNProbe)
    torch.nn.Module.__init__(probe)
    probe.embed = separable_embed
    probe.num_segments, probe.kmeans_iterations, probe.neighbours = 12, 10, 5
    probe.segments, probe.location_weight, probe.num_classes = "segsort", 1.0, C
    probe.bank, probe.bank_labels, probe.cluster_resolution = bank, labels, resolution
    image = _sample(100)["image"].float()[None] / 255
    scores = probe.scores(image)[0]
    if resolution == "embedding":
        assert scores.shape[-2:] == (8, 8) and scores.sum(0).max() == 5  # vote counts on the stride-4 grid
        return
    assert scores.shape == (C, 32, 32)
    assign, segments = _segments(separable_embed(image)[0], 12, 10, size=(32, 32))
    assert assign.shape == (32, 32)
    prediction = scores.argmax(0)
    bank_np, labels_np = F.normalize(bank, dim=-1).numpy(), labels.numpy()
    for s in assign.unique().tolist():
        nearest = np.argsort(-(bank_np @ F.normalize(segments[s], dim=0).numpy()), kind="stable")[:5]
        majority = np.bincount(labels_np[nearest], minlength=C).argmax()
        assert (prediction[assign == s] == majority).all()  # the whole segment: one label
    assert torch.equal(scores.sum(0), torch.ones(32, 32))  # one-hot: no soft borders
