"""SA-1B read straight from its tar files: the same samples as the extracted folder, sharded across ranks and
loader workers without repeats, and broken tars (corrupt member, JSON without image, truncation) named."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ovseg.data.files import DataError
from ovseg.data.samplers import EpochSeededSamples, ResumableShuffleSampler
from ovseg.data.sa1b import write_sa1b_tars, write_synthetic_sa1b
from ovseg.methods.pixelclip.data import SA1B

SMALL = dict(resize_short=40, crop_size=32, mask_resolution=16)


def _tars(tmp_path, num_images=6, images_per_tar=3):
    write_synthetic_sa1b(tmp_path / "extracted", num_images=num_images, images_per_tar=images_per_tar)
    return write_sa1b_tars(tmp_path / "extracted", tmp_path / "tars")


def _add_members(tar_path, members: dict[str, bytes]) -> None:
    with tarfile.open(tar_path, "a") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _sample(dataset, index, seed=0):
    np.random.seed(seed)
    return dataset[index]


def test_tar_source_yields_the_extracted_folder_samples(tmp_path):
    shards = _tars(tmp_path)
    assert [p.name for p in shards] == ["sa_000000.tar", "sa_000001.tar"]
    folder = SA1B(folder=str(tmp_path / "extracted"), **SMALL).build(tmp_path)
    tars = SA1B(folder="tars", **SMALL).build(tmp_path)  # layout auto: .tar files found
    assert type(tars.files).__name__ == "SA1BTars" and len(tars) == len(folder) == 6
    for index in range(6):
        a, b = _sample(folder, index, seed=index), _sample(tars, index, seed=index)
        # same key: sa_000000/sa_2.jpg <-> .../sa_000000.tar:sa_2.jpg
        extracted = a["meta"]["image_path"].split("/")[-2:]
        shard, member = b["meta"]["image_path"].rsplit(":", 1)
        assert [shard.split("/")[-1].removesuffix(".tar"), member] == extracted
        for key in ("image", "image_strong", "cutout", "masks"):
            assert torch.equal(a[key], b[key]), key


def test_two_ranks_with_two_workers_see_every_sample_once_per_epoch(tmp_path):
    _tars(tmp_path, num_images=8, images_per_tar=3)
    source = SA1B(folder="tars", **SMALL)
    dataset = source.build(tmp_path)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            sampler = ResumableShuffleSampler(len(dataset), rank, 2, seed=7)
            sampler.set_epoch(epoch)
            loader = DataLoader(EpochSeededSamples(dataset, 7), batch_size=2, sampler=sampler, num_workers=2,
                                collate_fn=source.collate)
            seen += [m["image_path"] for batch in loader for m in batch["meta"]]
        assert len(seen) == 8 and len(set(seen)) == 8


def test_tar_index_is_kept_in_index_dir(tmp_path, monkeypatch):
    _tars(tmp_path)
    first = SA1B(folder="tars", tar_index_dir="index", **SMALL).build(tmp_path)
    assert len(list((tmp_path / "index").glob("sa_00000*.npz"))) == 2

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned the tar again despite its index")

    monkeypatch.setattr("wids.wids_mmtar.MMIndexedTar", no_scan)
    again = SA1B(folder="tars", tar_index_dir="index", **SMALL).build(tmp_path)
    assert np.array_equal(first.files.index["image_at"], again.files.index["image_at"])
    assert torch.equal(_sample(first, 4)["masks"], _sample(again, 4)["masks"])


def test_corrupt_member_is_skipped_naming_shard_and_member(tmp_path, caplog):
    shards = _tars(tmp_path)
    record = json.loads((tmp_path / "extracted/sa_000000/sa_1.json").read_text())
    _add_members(shards[1], {"sa_99.jpg": b"not a jpeg", "sa_99.json": json.dumps(record).encode()})
    dataset = SA1B(folder="tars", **SMALL).build(tmp_path)
    assert len(dataset) == 7
    with caplog.at_level(logging.WARNING, logger="ovseg.methods.pixelclip.data"):
        sample = dataset[6]
    assert set(sample) == {"skipped"} and dataset.skipped == 1
    assert f"{shards[1]}:sa_99.jpg" in caplog.text and "cannot decode image" in caplog.text
    strict = SA1B(folder="tars", skip_bad=False, **SMALL).build(tmp_path)
    with pytest.raises(DataError, match=f"{shards[1]}:sa_99.jpg: cannot decode image"):
        strict[6]


def test_json_without_its_image_is_left_out_and_logged(tmp_path, caplog):
    shards = _tars(tmp_path)
    _add_members(shards[0], {"sa_50.json": b'{"annotations": []}'})
    with caplog.at_level(logging.WARNING, logger="ovseg.data.sa1b"):
        dataset = SA1B(folder="tars", **SMALL).build(tmp_path)
    assert len(dataset) == 6 and dataset.files.left_out == 1
    assert str(shards[0]) in caplog.text and "sa_50.json has no image" in caplog.text


def test_truncated_tar_keeps_what_is_whole_and_names_what_is_not(tmp_path, caplog):
    shards = _tars(tmp_path)
    data = shards[1].read_bytes()
    with tarfile.open(shards[1]) as tar:
        last = tar.getmembers()[-1]  # sa_6.json
    shards[1].write_bytes(data[: last.offset_data + last.size // 2])  # cut in the middle of the last member
    with caplog.at_level(logging.WARNING, logger="ovseg.data.sa1b"):
        dataset = SA1B(folder="tars", **SMALL).build(tmp_path)
    assert len(dataset) == 5 and "member sa_6.json is cut off" in caplog.text and str(shards[1]) in caplog.text
    # cut inside a header: the shard cannot be indexed
    shards[1].write_bytes(data[: last.offset + 100])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ovseg.data.sa1b"):
        dataset = SA1B(folder="tars", **SMALL).build(tmp_path)
    assert len(dataset) == 3 and dataset.files.broken_shards == [str(shards[1])]
    assert f"skipping shard {shards[1]}" in caplog.text
    with pytest.raises(DataError, match=f"{shards[1]}: cannot index the tar"):
        SA1B(folder="tars", skip_bad=False, **SMALL).build(tmp_path)


def test_open_shards_close_the_least_recently_used(tmp_path):
    import os

    from ovseg.data.sa1b import _OpenShards

    paths = [tmp_path / f"{i}.tar" for i in range(3)]
    for p in paths:
        p.write_bytes(b"x")
    shards = _OpenShards(2)
    first = shards.get(paths[0], 0)
    assert shards.get(paths[0], 0) == first  # reused, not reopened
    shards.get(paths[1], 1)
    shards.get(paths[0], 0)  # 0 is now the most recent: 1 goes next
    shards.get(paths[2], 2)
    assert list(shards.fds) == [0, 2]
    shards.close()
    assert not shards.fds
    with pytest.raises(OSError):
        os.fstat(first)
