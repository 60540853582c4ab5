"""User datasets through HF `datasets`: imagefolder + metadata.csv, parquet bytes, errors, DataModule."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

datasets = pytest.importorskip("datasets")

from ovseg.data.datamodule import OVSegDataModule  # noqa: E402
from ovseg.data.hf import HFSegDataset, build_hf_dataset  # noqa: E402
from ovseg.data.seg_dataset import DataError  # noqa: E402
from ovseg.data.specs import voc_palette  # noqa: E402

SIZES = [(5, 7), (8, 6), (4, 9)]  # (H, W), all different
NUM_CLASSES = 4


@pytest.fixture(autouse=True)
def hf_cache(tmp_path_factory, monkeypatch):
    """Keep the Arrow cache out of ~/.cache (datasets reads the env var at import, so patch config too)."""
    cache = tmp_path_factory.mktemp("hf_cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")
    return cache


def make_arrays(seed=0, values=(0, 1, 2, 3, 255)):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]
    masks = [rng.choice(np.array(values, dtype=np.uint8), size=(h, w)) for h, w in SIZES]
    return images, masks


def palette_png(mask: np.ndarray) -> Image.Image:
    im = Image.fromarray(mask, mode="L").convert("P")
    im.putpalette(voc_palette().flatten().tolist())
    return im


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_imagefolder(folder, images, masks, mask_modes=None, mask_override=None):
    """images/*.png + masks (palette or grey index PNGs) + metadata.csv pairing them."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["file_name,mask_file_name"]
    for i, (img, mask) in enumerate(zip(images, masks)):
        Image.fromarray(img).save(folder / f"img{i}.png")
        mode = (mask_modes or ["P", "L", "P"])[i % 3]
        m = mask_override(i, mask) if mask_override else (palette_png(mask) if mode == "P" else Image.fromarray(mask))
        m.save(folder / f"img{i}_mask.png")
        rows.append(f"img{i}.png,img{i}_mask.png")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    (folder / "classes.txt").write_text("background\ncat,kitty\ndog\nsky\n")
    return folder


def entry(**kw):
    base = {"name": "mydata", "hf": {"path": "imagefolder", "data_dir": "my_set"}, "class_names": "my_set/classes.txt"}
    base.update(kw)
    return base


@pytest.fixture
def folder_set(tmp_path):
    images, masks = make_arrays()
    write_imagefolder(tmp_path / "my_set", images, masks)
    return tmp_path, images, masks


def test_imagefolder_samples_equal_written_arrays(folder_set):
    root, images, masks = folder_set
    ds = build_hf_dataset(entry(split="train", background_index=0), root=str(root), limit=None)
    assert isinstance(ds, HFSegDataset)
    assert (ds.name, ds.num_classes, ds.background_index) == ("mydata", 4, 0)
    assert ds.class_names == [["background"], ["cat", "kitty"], ["dog"], ["sky"]]
    assert len(ds) == 3
    for i in range(3):
        s = ds[i]
        assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, *SIZES[i])
        assert np.array_equal(s["image"].permute(1, 2, 0).numpy(), images[i])
        assert s["label"].dtype == torch.int64
        assert np.array_equal(s["label"].numpy(), masks[i].astype(np.int64))  # palette indices, not colours
        assert np.array_equal(ds.load_label(i), masks[i])
        assert s["meta"] == {"dataset": "mydata", "id": f"img{i}", "image_path": s["meta"]["image_path"], "index": i}
        assert s["meta"]["image_path"].endswith(f"img{i}.png")


def test_single_split_is_chosen_without_split_key_and_limit_keeps_first_rows(folder_set):
    root, images, _ = folder_set
    ds = build_hf_dataset(entry(), root=root, limit=2)
    assert len(ds) == 2
    assert np.array_equal(ds[1]["image"].permute(1, 2, 0).numpy(), images[1])
    with pytest.raises(IndexError):
        ds[2]


def test_reduce_zero_label(tmp_path):
    images, masks = make_arrays(values=(0, 1, 2, 3, 4, 255))
    write_imagefolder(tmp_path / "my_set", images, masks)
    ds = build_hf_dataset(entry(reduce_zero_label=True), root=tmp_path, limit=None)
    for i, raw in enumerate(masks):
        expected = raw.astype(np.int64) - 1
        expected[(raw == 0) | (raw == 255)] = 255
        assert np.array_equal(ds[i]["label"].numpy(), expected)


@pytest.mark.parametrize("writer", ["pyarrow_binary", "datasets_image"])
def test_parquet_with_image_and_mask_bytes(tmp_path, writer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, masks = make_arrays(seed=5)
    (tmp_path / "data").mkdir()
    image_bytes = [png_bytes(Image.fromarray(im)) for im in images]
    mask_bytes = [png_bytes(palette_png(m) if i != 1 else Image.fromarray(m)) for i, m in enumerate(masks)]
    for part, rows in enumerate([slice(0, 2), slice(2, 3)]):
        out = tmp_path / "data" / f"part{part}.parquet"
        if writer == "pyarrow_binary":  # plain binary columns, as pandas/pyarrow write them
            pq.write_table(pa.table({"image": image_bytes[rows], "mask": mask_bytes[rows]}), out)
        else:  # Image features with embedded bytes, as datasets writes them
            features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
            datasets.Dataset.from_dict(
                {"image": [{"bytes": b, "path": None} for b in image_bytes[rows]],
                 "mask": [{"bytes": b, "path": None} for b in mask_bytes[rows]]},
                features=features,
            ).to_parquet(str(out))
    (tmp_path / "names.txt").write_text("a\nb\nc\nd\n")
    ds = build_hf_dataset(
        {"name": "pq", "hf": {"path": "parquet", "data_files": {"validation": "data/*.parquet"}},
         "split": "validation", "class_names": "names.txt"},
        root=tmp_path,
        limit=None,
    )
    assert len(ds) == 3 and ds.num_classes == 4
    for i in range(3):
        s = ds[i]
        assert np.array_equal(s["image"].permute(1, 2, 0).numpy(), images[i])
        assert np.array_equal(s["label"].numpy(), masks[i].astype(np.int64))
        assert s["meta"]["id"] == str(i) and s["meta"]["dataset"] == "pq"


def test_inline_and_shipped_class_names(folder_set):
    root, _, _ = folder_set
    assert build_hf_dataset(entry(class_names="cat,dog;puppy,sky,x"), root=root, limit=1).class_names == [
        ["cat"], ["dog", "puppy"], ["sky"], ["x"]
    ]
    with pytest.raises(DataError, match=r"outside the 3 classes"):
        build_hf_dataset(entry(class_names="cat,dog,sky"), root=root, limit=None)[0]
    ds = build_hf_dataset(entry(class_names="voc21"), root=root, limit=1)
    assert ds.num_classes == 21


def test_missing_class_names_is_an_error(folder_set):
    root, _, _ = folder_set
    e = entry()
    del e["class_names"]
    with pytest.raises(ValueError, match="class_names.*required"):
        build_hf_dataset(e, root=root, limit=None)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        build_hf_dataset(entry(class_names="nope.txt"), root=root, limit=None)


def test_missing_column_lists_available(folder_set):
    root, _, _ = folder_set
    with pytest.raises(DataError, match=r"mask column 'seg' not found; available columns: \['image', 'mask'\]"):
        build_hf_dataset(entry(mask_column="seg"), root=root, limit=None)
    with pytest.raises(DataError, match=r"image column 'pixels' not found.*\['image', 'mask'\]"):
        build_hf_dataset(entry(image_column="pixels"), root=root, limit=None)


def test_rgb_mask_is_an_error_naming_the_row(tmp_path):
    images, masks = make_arrays()
    rgb = lambda i, m: Image.fromarray(voc_palette()[m]) if i == 1 else palette_png(m)  # noqa: E731
    write_imagefolder(tmp_path / "my_set", images, masks, mask_override=rgb)
    ds = build_hf_dataset(entry(), root=tmp_path, limit=None)
    ds[0]
    with pytest.raises(DataError, match=r"'mydata' row 1 \(.*img1_mask\.png\): mask has mode RGB.*index PNG"):
        ds[1]


def test_size_mismatch_is_an_error(tmp_path):
    images, masks = make_arrays()
    masks[2] = masks[2][:, :-1]
    write_imagefolder(tmp_path / "my_set", images, masks)
    ds = build_hf_dataset(entry(), root=tmp_path, limit=None)
    with pytest.raises(DataError, match=r"row 2 .*img2_mask\.png.*mask size 8x4 differs from its image.*9x4"):
        ds[2]


def test_out_of_range_value_is_an_error(tmp_path):
    images, masks = make_arrays()
    masks[0][0, 0] = 7
    write_imagefolder(tmp_path / "my_set", images, masks)
    ds = build_hf_dataset(entry(), root=tmp_path, limit=None)
    with pytest.raises(DataError, match=r"'mydata' row 0 .*img0_mask\.png.*values \[7\] outside the 4 classes"):
        ds[0]
    with pytest.raises(DataError, match=r"values \[7\]"):
        ds.load_label(0)


def test_bad_entries(folder_set):
    root, _, _ = folder_set
    with pytest.raises(ValueError, match="unknown keys"):
        build_hf_dataset(entry(mask_col="mask"), root=root, limit=None)
    with pytest.raises(DataError, match=r"Unknown split"):
        build_hf_dataset(entry(split="validation"), root=root, limit=None)
    with pytest.raises(ValueError, match="background_index 9"):
        build_hf_dataset(entry(background_index=9), root=root, limit=None)


def test_hub_name_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataError, match=r"someuser/some-seg-dataset.*HF_HUB_OFFLINE.*cache"):
        build_hf_dataset(
            {"name": "hubset", "hf": {"path": "someuser/some-seg-dataset"}, "split": "validation",
             "class_names": "cat,dog,sky"},
            root=tmp_path,
            limit=None,
        )


def test_missing_datasets_package_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    from ovseg.data.hf import _import_datasets

    with pytest.raises(ImportError, match=r"pip install ovseg\[hf\]"):
        _import_datasets()


def test_datamodule_with_hf_entry(folder_set):
    root, images, masks = folder_set
    dm = OVSegDataModule(
        root=str(root),
        datasets=[entry(split="train", background_index=0)],
        num_workers=0,
        eval_batch_size=2,
    )
    dm.setup("test")
    (loader,) = dm.test_dataloader()
    batch = next(iter(loader))
    assert set(batch) == {"image", "label", "meta"}
    assert len(batch["image"]) == 2
    assert [m["dataset"] for m in batch["meta"]] == ["mydata", "mydata"]
    assert torch.equal(batch["label"][0], torch.from_numpy(masks[0].astype(np.int64)))
    assert sum(len(b["image"]) for b in loader) == 3


def test_id_column_and_16bit_grey_mask(tmp_path):
    images, masks = make_arrays()
    write_imagefolder(
        tmp_path / "my_set", images, masks,
        mask_override=lambda i, m: Image.fromarray(m.astype(np.uint16)),  # mode I;16
    )
    meta = (tmp_path / "my_set" / "metadata.csv").read_text().splitlines()
    meta = [meta[0] + ",uid"] + [f"{row},sample-{i}" for i, row in enumerate(meta[1:])]
    (tmp_path / "my_set" / "metadata.csv").write_text("\n".join(meta) + "\n")
    ds = build_hf_dataset(entry(id_column="uid"), root=tmp_path, limit=None)
    for i in range(3):
        s = ds[i]
        assert s["meta"]["id"] == f"sample-{i}"
        assert np.array_equal(s["label"].numpy(), masks[i].astype(np.int64))


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data_dir 'nowhere' not found"):
        build_hf_dataset(entry(hf={"path": "imagefolder", "data_dir": "nowhere"}, class_names="a,b"),
                         root=tmp_path, limit=None)
