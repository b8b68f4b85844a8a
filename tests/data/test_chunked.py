"""Compressed chunked volumes: any window reads as numpy's slice would, a damaged file is named, and the store
keeps its labels (with the skeletons packed in) in them (an older store format is rebuilt once, with one log line)."""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import store as store_mod
from pipeline.data.chunked import ChunkedVolume, chunked_problem, write_chunked
from pipeline.data.datalist import DatasetError, prepare_datalists
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
    left = {p for p in cache.iterdir() if any(p.name.startswith(s.name + ".") for s in old_stems) and p.suffix != ".lock"}
    assert not left, left  # the old entries' files are gone (their locks stay: another process may hold one)
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


def test_a_replaced_file_is_never_read_with_the_old_index(tmp_path):
    path = tmp_path / "a.chunks"
    first = np.zeros((20, 20, 20), np.uint8)
    vol = _write(path, first)
    shipped = pickle.dumps(vol)  # as a loader worker receives it
    second = np.random.default_rng(1).integers(0, 3, (20, 20, 20)).astype(np.uint8)
    with open(tmp_path / "b.chunks", "wb") as f:
        write_chunked(f, second, chunk=8)
    os.replace(tmp_path / "b.chunks", path)  # as the store rewrites a label file
    assert np.array_equal(np.asarray(vol), first)  # the open view keeps reading the file it mapped
    assert np.array_equal(np.asarray(pickle.loads(shipped)), second)  # a reopened one reads the new file whole


def test_a_damaged_chunk_is_named(tmp_path):
    path = tmp_path / "a.chunks"
    vol = _write(path, np.random.default_rng(0).integers(0, 3, (16, 16, 16)).astype(np.uint8))
    data = bytearray(path.read_bytes())
    data[-20:] = bytes(20)  # the last chunk's bytes, same size: the size check cannot see it
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"a\.chunks: chunk 7 decodes to .*delete it and restart"):
        np.asarray(ChunkedVolume(path))
    del vol
    # on the command lines: one expected line, exit 2, however deep in the loader it was raised
    from pipeline.utils.errors import one_line

    try:
        np.asarray(ChunkedVolume(path))
    except ValueError as e:
        wrapped = RuntimeError("applying transform")  # as MONAI's apply_transform wraps it
        wrapped.__cause__ = e
        line, code, expected = one_line(wrapped)
    assert expected and code == 2 and line.startswith(f"error: {path}: chunk 7 decodes to")


def test_label_file_rewritten_in_this_process_is_read_again(tiny_dataset: Path, tmp_path):
    """The window cache knows which file it decoded: a skeleton added by a later build is seen at once."""
    from pipeline.data.store import StoreDataset
    from transforms.crop import cut_patch

    lists = {"train": prepare_datalists(tiny_dataset, check=False)["train"][:1]}
    cache = tmp_path / "store"
    plain = build_store(lists, cache)["train"][0]
    window = ((0, 16), (0, 16), (0, 16))
    before = StoreDataset([plain], mode="mmap")[0]
    cut_patch(before["label"], window, (16, 16, 16))
    item = build_store(lists, cache, skeletons=["train"])["train"][0]
    after = StoreDataset([item], mode="mmap")[0]
    packed = np.asarray(ChunkedVolume(item["label"]))[:16, :16, :16]
    assert np.array_equal(np.asarray(cut_patch(after["skeleton"], window, (16, 16, 16)))[0], packed >> 2)


def test_an_interrupted_rebuild_never_keeps_a_skeleton_it_lost(tiny_dataset: Path, tmp_path, monkeypatch):
    """A damaged entry rebuilt by a run without skeletons, killed before its .json: the next run with skeletons
    must rebuild it with the skeleton, not trust the old .json."""
    lists = {"train": prepare_datalists(tiny_dataset, check=False)["train"][:1]}
    cache = tmp_path / "store"
    item = build_store(lists, cache, skeletons=["train"])["train"][0]
    image = Path(item["image"])
    image.write_bytes(image.read_bytes()[:-10])

    real_save = np.save

    def killed_at_centres(f, arr, **kwargs):  # the label is rewritten by now; the .json would come after
        if "centres" in str(getattr(f, "name", "")):
            raise KeyboardInterrupt
        return real_save(f, arr, **kwargs)

    monkeypatch.setattr(store_mod.np, "save", killed_at_centres)
    with pytest.raises(KeyboardInterrupt):
        build_store(lists, cache)
    monkeypatch.undo()
    again = build_store(lists, cache, skeletons=["train"])["train"][0]
    label = np.asarray(ChunkedVolume(again["label"]))
    assert (label >> 2).any() and np.array_equal(label >> 2, store_mod.tubed_skeleton(label & 3))


def test_label_values_above_2_are_refused_even_unchecked(tiny_dataset: Path, tmp_path):
    import shutil

    import tifffile

    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    lists = prepare_datalists(data, check=False)
    case = lists["train"][0]
    label = tifffile.imread(case["label"])
    label[0, 0, 0] = 3
    tifffile.imwrite(case["label"], label)
    with pytest.raises(DatasetError, match=rf"{Path(case['label']).name}: label value 3; labels are 0"):
        build_store({"train": [case]}, tmp_path / "store", check=False)


def test_space_check_counts_the_older_entries_it_replaces(tmp_path, monkeypatch):
    from pipeline.data.store import StoreError, _check_space, _Entry

    src = tmp_path / "src"
    src.mkdir()
    image = src / "1.tif"
    import tifffile

    tifffile.imwrite(image, np.zeros((64, 64, 64), np.uint8))
    cache = tmp_path / "store"
    cache.mkdir()
    entry = _Entry(cache, {"id": "1", "image": str(image), "label": str(image)})
    old = cache / "1-0000000000000000"
    (old.parent / (old.name + ".json")).write_text('{"sources": {"image": {"path": "%s"}, "version": 1}}' % image.resolve())
    with open(old.parent / (old.name + ".image.npy"), "wb") as f:
        f.truncate(50 * 2**20)  # 50 MiB of an older entry, freed once the new one is built
    need = (1 + store_mod._LABEL_BYTES) * 64**3 + 8 * 1000
    todo = [(entry, "not built", "missing")]
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda p: type("u", (), {"free": int(need) + 1})())
    _check_space(cache, todo, 1000, workers=1)  # fits: the old files free more than the new entry takes
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda p: type("u", (), {"free": int(need) // 2})())
    with pytest.raises(StoreError, match=r"needs 0\.0 GiB more \(after the 0\.0 GiB of older entries it replaces"):
        _check_space(cache, todo, 1000, workers=1)  # the entry in flight still needs its own room
