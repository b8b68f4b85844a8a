"""Compressed chunked volumes: any window reads as numpy's slice would, a damaged file is named, and the store
keeps its labels (with the skeletons packed in) in them (an older store format is rebuilt once, with one log line)."""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import store as store_mod
from pipeline.data.chunked import ChunkedVolume, chunked_problem, write_chunked
from pipeline.data.datalist import prepare_datalists
from pipeline.data.store import build_store


def _write(path: Path, array: np.ndarray, chunk: int = 8) -> ChunkedVolume:
    with open(path, "wb") as f:
        write_chunked(f, array, chunk=chunk)
    return ChunkedVolume(path)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_every_window_reads_as_numpy_slices(tmp_path, dtype):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 3, (19, 24, 13)).astype(dtype)  # edges not multiples of the chunk
    vol = _write(tmp_path / "a.chunks", array)
    assert (vol.shape, vol.dtype, vol.ndim) == (array.shape, np.dtype(dtype), 3)
    assert np.array_equal(np.asarray(vol), array) and np.asarray(vol).dtype == dtype
    for _ in range(50):
        window = []
        for n in array.shape:
            a, b = sorted(rng.integers(0, n + 1, 2))
            window.append(slice(int(a), int(b)))
        assert np.array_equal(vol[tuple(window)], array[tuple(window)]), window
    assert np.array_equal(vol[2:5], array[2:5]) and np.array_equal(vol[-4:, :3], array[-4:, :3])
    assert vol[5:5].shape == (0, 24, 13)
    again = pickle.loads(pickle.dumps(vol))  # a loader worker reopens the map
    assert np.array_equal(again[1:9, 3:20, 0:13], array[1:9, 3:20, 0:13])
    with pytest.raises(ValueError, match="step 1"):
        vol[::2]
    with pytest.raises(ValueError, match="windows of slices"):
        vol[3]


def test_labels_compress_and_damage_is_named(tmp_path):
    label = np.zeros((48, 48, 48), np.uint8)
    label[:, 20:24] = 1
    label[30:] = 2
    path = tmp_path / "label.chunks"
    _write(path, label, chunk=16)
    assert path.stat().st_size < 0.05 * label.size
    assert chunked_problem(path, (48, 48, 48), np.uint8) is None
    assert chunked_problem(path, (48, 48, 47), np.uint8).startswith("holds uint8 (48, 48, 48), expected")
    assert chunked_problem(path, (48, 48, 48), np.uint16).startswith("holds uint8")
    assert chunked_problem(tmp_path / "none.chunks", None, np.uint8) == "missing"
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    assert chunked_problem(path, (48, 48, 48), np.uint8).startswith("truncated")
    path.write_bytes(b"garbage" + data)
    assert chunked_problem(path, (48, 48, 48), np.uint8).startswith("unreadable header")
    with pytest.raises(ValueError, match="3D"):
        write_chunked(io.BytesIO(), np.zeros((4, 4)))


def test_store_keeps_label_and_skeleton_compressed_and_rebuilds_an_older_format(tiny_dataset: Path, tmp_path, monkeypatch, caplog):
    lists = prepare_datalists(tiny_dataset, check=False)
    cache = tmp_path / "store"
    monkeypatch.setattr(store_mod, "PREPROCESS_VERSION", 1)  # entries as an older version keyed them
    build_store(lists, cache)
    old_stems = {p.with_suffix("") for p in cache.glob("*.json")}
    for stem in old_stems:  # and its uncompressed label file
        np.save(f"{stem}.label.npy", np.zeros(3, np.uint8))
    monkeypatch.undo()

    with caplog.at_level(logging.INFO, logger="pipeline.data.store"):
        store = build_store(lists, cache, skeletons=["train"])
    n = len(old_stems)
    assert caplog.text.count("older format") == 1 and f"{n} of format 1" in caplog.text
    left = {p for p in cache.iterdir() if any(p.name.startswith(s.name + ".") for s in old_stems)}
    assert not left, left  # the old entries' files are gone
    for item in store["train"]:
        assert item["label"].endswith(".label.chunks") and item["skeleton"] == item["label"]  # packed in one file
        shape = tuple(item["shape"])
        assert ChunkedVolume(item["label"]).shape == shape
        assert Path(item["label"]).stat().st_size < 0.25 * np.prod(shape)
        assert Path(item["image"]).stat().st_size == pytest.approx(np.prod(shape), abs=256)  # uncompressed: mapped
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.data.store"):
        build_store(lists, cache, skeletons=["train"])
    assert "older format" not in caplog.text and "0 built by this process" in caplog.text


def test_a_crop_decodes_label_and_skeleton_once(tiny_dataset: Path, tmp_path, monkeypatch):
    """The skeleton is packed with the label: cutting both from one window decodes its chunks once, and the cache
    holds one window for all entries (a whole volume, as validation reads it, is not kept)."""
    from pipeline.data.store import PackedVolume, StoreDataset
    from transforms.crop import RandCropByStoredCentresd

    lists = prepare_datalists(tiny_dataset, check=False)
    store = build_store({"train": lists["train"]}, tmp_path / "store", skeletons=["train"])
    reads = []
    real = ChunkedVolume.read
    monkeypatch.setattr(ChunkedVolume, "read", lambda self, window: reads.append(window) or real(self, window))
    crop = RandCropByStoredCentresd(["image", "label", "skeleton"], spatial_size=[16, 16, 16], num_samples=3).set_random_state(0)
    ds = StoreDataset(store["train"], transform=crop, mode="mmap")
    for i in range(len(ds)):
        reads.clear()
        patches = ds[i]
        assert len(reads) == 3  # one decode per window, for label and skeleton together
        for patch in patches:
            label, skeleton = np.asarray(patch["label"]), np.asarray(patch["skeleton"])
            assert set(np.unique(label)) <= {0, 1, 2} and set(np.unique(skeleton)) <= {0, 1}
            assert not (skeleton.astype(bool) & (label != 1)).any()  # on the surface only
    last = PackedVolume._last
    assert last is not None and last[1].size <= 16**3
    whole = StoreDataset(store["train"][:1], mode="mmap")[0]
    assert np.array_equal(np.asarray(whole["label"]), np.asarray(ChunkedVolume(store["train"][0]["label"])) & 3)
    assert PackedVolume._last is last  # the whole volume bypassed the window cache
