"""Tests for the volume store (pipeline.data.store), the crops cut from it (transforms.crop) and device augmentation
(pipeline.data.augment): round trip, invalidation, concurrent builders, corrupt files, bad input, exact resume and DDP
through the real train.yaml on the memory-mapped path."""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.transforms import RandFlipd, RandRotate90d

from pipeline.data import store as store_mod
from pipeline.data.augment import DeviceAugment
from pipeline.data.chunked import ChunkedVolume
from pipeline.data.datalist import DatasetError, prepare_datalists, validation_subset
from pipeline.data.store import StoreDataset, StoreError, build_store, choose_mode
from tests.conftest import CONFIGS, TINY_TRAIN
from transforms.crop import RandCropByStoredCentresd, crop_window, cut_patch
from transforms.io import read_volume, write_volume

FORK = multiprocessing.get_context("fork")
QUIET = {"training_curves": False, "tensorboard_preview": False, "monitor_resources": False, "val_score": False}


@pytest.fixture()
def dataset(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset (tests here modify files)."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


def _store_files(cache_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache_dir.iterdir() if p.suffix in (".npy", ".chunks", ".json")}


def test_round_trip_crop_equals_crop_of_original(dataset: Path, tmp_path: Path) -> None:
    lists = prepare_datalists(dataset, check=False)
    store = build_store(lists, tmp_path / "store")
    item = store["train"][0]
    image, label = read_volume(item["source_image"]), read_volume(lists["train"][0]["label"])
    assert item["shape"] == list(image.shape)
    assert item["image_stats"] == pytest.approx([image.mean(), image.std()], rel=1e-6)
    # every centre is a voxel of its class (the sample is the whole class on a tiny volume)
    assert item["centres_per_class"] == [int((label == 0).sum()), int((label == 1).sum())]

    crops = {}
    for mode in ("ram", "mmap"):
        ds = StoreDataset(store["train"], mode=mode)
        crop = RandCropByStoredCentresd(["image", "label"], spatial_size=[16, 20, 24], ratios=[0.3, 0.7], num_samples=4)
        crop.set_random_state(5)
        data = ds[0]
        assert isinstance(data["image"], np.memmap) == (mode == "mmap")
        samples = crop(data)
        crops[mode] = samples
        for sample, window in zip(samples, crop.cropper.windows, strict=True):
            assert "centres" not in sample and sample["id"] == item["id"]
            assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (1, 16, 20, 24)
            expect = image[tuple(slice(a, b) for a, b in window)]
            assert np.array_equal(sample["image"][0].numpy(), expect)
            assert np.array_equal(sample["label"][0].numpy(), label[tuple(slice(a, b) for a, b in window)])
    for a, b in zip(crops["ram"], crops["mmap"], strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_crop_pads_small_volumes_and_follows_ratios() -> None:
    vol = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    window = crop_window((0, 4, 5), vol.shape, (8, 4, 4))
    assert window == ((0, 4), (1, 5), (2, 6))  # clamped into the volume; the short axis takes all of it
    patch = cut_patch(vol, window, (8, 4, 4), pad_value=2)
    assert patch.shape == (1, 8, 4, 4) and np.array_equal(patch[0, 2:6].numpy(), vol[:, 1:5, 2:6])
    assert (patch[0, :2] == 2).all() and (patch[0, 6:] == 2).all()

    label = np.zeros((20, 20, 20), dtype=np.uint8)
    label[10, 10, 10] = 1
    centres = [np.flatnonzero(label == 0).astype(np.int32), np.flatnonzero(label == 1).astype(np.int32)]
    crop = RandCropByStoredCentresd(["image", "label"], spatial_size=4, ratios=[0.0, 1.0], num_samples=3)
    crop.set_random_state(0)
    out = crop({"image": label * 100, "label": label, "centres": centres})
    assert all(o["label"].sum() == 1 for o in out)  # always centred on the one surface voxel


def test_changed_source_is_rebuilt_and_unchanged_never(dataset: Path, tmp_path: Path, caplog) -> None:
    lists = prepare_datalists(dataset, check=False)
    cache = tmp_path / "store"
    build_store(lists, cache)
    before = _store_files(cache)
    with caplog.at_level(logging.INFO):
        build_store(lists, cache)
    assert "0 built by this process" in caplog.text and _store_files(cache) == before

    case = lists["train"][0]
    label = read_volume(case["label"])
    label[label == 1] = 0
    write_volume(case["label"], label)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        store = build_store(lists, cache)
    assert "building 1 of" in caplog.text
    after = _store_files(cache)
    assert len(after) == len(before)  # the stale entry of the changed case is removed
    changed = [n for n in after if n not in before]
    assert changed and all(n.startswith(f"{case['id']}-") for n in changed)
    assert store["train"][0]["centres_per_class"][1] == 0
    assert {n: t for n, t in after.items() if n in before} == {n: t for n, t in before.items() if n in after}


def _build_in_child(dataset: str, cache: str, log: str) -> None:
    logging.basicConfig(filename=log, level=logging.INFO, force=True)
    build_store(prepare_datalists(dataset, check=False), cache, workers=1)


def test_concurrent_builders_share_the_work_and_read_valid_entries(dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "store"
    children = [FORK.Process(target=_build_in_child, args=(str(dataset), str(cache), str(tmp_path / f"{i}.log"))) for i in range(2)]
    for c in children:
        c.start()
    for c in children:
        c.join(120)
    assert [c.exitcode for c in children] == [0, 0]
    built = [int(re.search(r"\((\d+) built by this process\)", (tmp_path / f"{i}.log").read_text())[1]) for i in range(2)]
    assert sum(built) == 5  # each entry built exactly once: the other builder waited on its lock and reused it
    assert all(e is None for e in [store_mod._Entry(cache, c).problem() for c in prepare_datalists(dataset, check=False)["train"]])


def test_corrupt_or_truncated_file_is_rebuilt_with_a_warning(dataset: Path, tmp_path: Path, caplog) -> None:
    lists = prepare_datalists(dataset, check=False)
    cache = tmp_path / "store"
    item = build_store(lists, cache)["train"][0]
    good = np.load(item["image"])
    data = Path(item["image"]).read_bytes()
    Path(item["image"]).write_bytes(data[: len(data) // 2])
    Path(item["centres"]).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        again = build_store(lists, cache)["train"][0]
    assert f"rebuilding {item['image']}: truncated" in caplog.text
    assert np.array_equal(np.load(again["image"]), good)


def test_bad_store_folder_full_disk_and_changing_source(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    lists = prepare_datalists(dataset, check=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match=f"{blocker / 'store'}: volume store folder is not writable"):
        build_store(lists, blocker / "store")

    cache = tmp_path / "store"
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(StoreError, match=f"{cache}: the volume store needs .* GiB free"):
        build_store(lists, cache)
    monkeypatch.undo()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.np, "save", no_space)
    with pytest.raises(StoreError, match=r"\.image\.npy: disk full while writing the volume store"):
        build_store(lists, cache, workers=1)
    monkeypatch.undo()
    assert not list(cache.glob("*.json")) and not list(cache.glob("*.npy")) and not list(cache.glob("*.chunks"))  # nothing half-written looks valid

    real_read = store_mod.read_volume

    def read_then_touch(path):
        arr = real_read(path)
        os.utime(path, ns=(1, 1))
        return arr

    monkeypatch.setattr(store_mod, "read_volume", read_then_touch)
    with pytest.raises(StoreError, match="changed while the volume store was being built"):
        build_store(lists, cache, workers=1)


def test_mode_is_chosen_by_free_memory_and_logged(monkeypatch, caplog) -> None:
    items = [{"shape": [320, 320, 320]}] * 10  # 0.61 GiB of images and labels
    with caplog.at_level(logging.INFO):
        monkeypatch.setattr(store_mod, "available_memory", lambda: 8 * 2**30)
        assert choose_mode(items, "auto") == "ram"
        monkeypatch.setattr(store_mod, "available_memory", lambda: 1 * 2**30)
        assert choose_mode(items, "auto") == "mmap"
        assert choose_mode(items, "auto", copies=1) == "mmap"
        monkeypatch.setattr(store_mod, "available_memory", lambda: 2 * 2**30)
        assert choose_mode(items, "auto", copies=2) == "mmap"  # two DDP ranks would each hold a copy
    assert "memory-mapped (2 x 0.61 GiB of uint8 volumes > 50% of 2.00 GiB available)" in caplog.text
    with pytest.raises(ValueError, match="store_mode 'disk' unknown"):
        choose_mode(items, "disk")


def test_validation_subset_is_fixed_and_spread() -> None:
    cases = [{"id": str(i)} for i in range(20)]
    assert [c["id"] for c in validation_subset(cases, 4)] == ["0", "6", "13", "19"]
    assert validation_subset(cases, None) == cases and validation_subset(cases, 50) == cases


def test_device_augment_applies_one_transform_to_image_and_label() -> None:
    torch.manual_seed(0)
    image = torch.rand(3, 1, 6, 7, 8)
    label = (image > 0.5).float()
    aug = DeviceAugment([RandFlipd(["image", "label"], prob=1.0, spatial_axis=0), RandRotate90d(["image", "label"], prob=0.5, spatial_axes=(1, 2))])
    aug.transform.set_random_state(3)
    x, y = aug({"image": image, "label": label}, torch.device("cpu"))
    assert x.device.type == "cpu" and type(x) is torch.Tensor and x.shape[0] == 3
    assert torch.equal(y, (x > 0.5).float())  # image and label moved together, sample by sample
    flipped_only = DeviceAugment([RandFlipd(["image", "label"], prob=1.0, spatial_axis=0)])
    x2, _ = flipped_only({"image": image, "label": label}, "cpu")
    assert torch.equal(x2, torch.flip(image, (2,)))


def _bundle(dataset: Path, root: Path, **extra) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({**TINY_TRAIN, **QUIET, "dataset_dir": str(dataset), "output_dir": str(root / "out"), "cache_dir": str(root / "store"),
                   "ckpt_dir": str(root / "models"), "val_interval": 100, **extra})
    parser.get_parsed_content("imports")
    return parser


def _train(parser: ConfigParser, stop_at: int | None = None) -> tuple[dict[int, float], torch.nn.Module]:
    parser.get_parsed_content("initialize")  # seeds first, then builds the trainer, as the bundle's run does
    trainer = parser.get_parsed_content("train#trainer")
    losses: dict[int, float] = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.__setitem__(e.state.iteration, e.state.output["loss"].item()))
    if stop_at is not None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), lambda e: e.terminate())
    trainer.run()
    return losses, parser.get_parsed_content("network")


@pytest.mark.parametrize(
    ("mode", "num_workers", "extra"),
    [("mmap", 0, {}), ("mmap", 2, {}), ("ram", 0, {"skeleton_recall_weight": 0.0}), ("mmap", 0, {"ema": True, "ema_decay": 0.9, "skeleton_recall_weight": 1.0}),
     ("mmap", 0, {"augment_on_device": True, "skeleton_recall_weight": 1.0})],  # CUDA's path: the target cast on the device
)
def test_exact_mid_epoch_resume_through_the_store(dataset: Path, tmp_path: Path, mode: str, num_workers: int, extra: dict) -> None:
    common = {"store_mode": mode, "num_workers": num_workers, "epochs": 3, **extra}
    ref = _bundle(dataset, tmp_path / "ref", **common)
    reference, ref_net = _train(ref)
    # timed checkpoint at every iteration, stopped after iteration 3 (mid epoch 2 of 2 iterations an epoch)
    first, _ = _train(_bundle(dataset, tmp_path / "run", checkpoint_interval_minutes=1e-9, **common), stop_at=3)
    assert reference.keys() == set(range(1, 7)) and first == {k: reference[k] for k in (1, 2, 3)}
    run = _bundle(dataset, tmp_path / "run", seed=0, **common)
    resumed, net = _train(run)
    assert sorted(resumed) == [4, 5, 6]
    assert {k: reference[k] for k in resumed} == resumed  # bit-equal losses
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), ref_net.parameters(), strict=True))
    metas = Path(run.get_parsed_content("cache_dir")).glob("*.json")
    skeletons = [m for m in metas if json.loads(m.read_text())["skeleton"]]
    assert bool(skeletons) == bool(run.get_parsed_content("skeleton_recall_weight"))  # built only when the loss uses them
    if extra.get("ema"):  # the average continued bit for bit, and it is not the raw network
        ema, ref_ema = run.get_parsed_content("ema_handler"), ref.get_parsed_content("ema_handler")
        assert ema.num_updates == ref_ema.num_updates == 6
        pairs = list(zip(ema.ema_model.parameters(), ref_ema.ema_model.parameters(), strict=True))
        assert all(torch.equal(p, q) for p, q in pairs)
        assert not all(torch.equal(p, q) for p, q in zip(ema.ema_model.parameters(), net.parameters(), strict=True))


def test_ranks_of_a_machine_split_the_build(dataset: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    """Each local rank builds its share (the DDP barrier then waits for the others; test_ddp.py trains 2 gloo
    processes on the memory-mapped store)."""
    lists = prepare_datalists(dataset, check=False)
    cache = tmp_path / "store"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(StoreError, match=r"\.json: missing after the build"):  # alone, rank 1 finds rank 0's share missing
        build_store(lists, cache)
    assert len(list(cache.glob("*.json"))) == 2
    monkeypatch.setenv("LOCAL_RANK", "0")
    with caplog.at_level(logging.INFO):
        build_store(lists, cache)
    assert "(3 built by this process)" in caplog.text


def _as_uint16(path: Path) -> np.ndarray:
    """Rewrite a uint8 volume as uint16 (x 100 + 1000, as scroll CT spans the 16-bit range); the new array."""
    import tifffile

    arr = read_volume(path).astype(np.uint16) * 100 + 1000
    tifffile.imwrite(path, arr, compression="lzw", photometric="minisblack")
    return arr


def test_uint16_image_is_kept_and_normalises_as_its_uint8_source(tiny_dataset: Path, dataset: Path, tmp_path: Path, caplog) -> None:
    """z-scoring is invariant to x * 100 + 1000: the patches the network sees equal the uint8 source's."""
    import tifffile

    from transforms.crop import StoredVolumed
    from transforms.intensity import NormalizeWithStatsd

    lists = prepare_datalists(dataset, check=False)
    case = lists["train"][0]
    wide = _as_uint16(Path(case["image"]))
    tifffile.imwrite(case["label"], read_volume(case["label"]).astype(np.uint16))  # a uint16 label of 0/1/2 is cast
    store = build_store(prepare_datalists(dataset, check=True), tmp_path / "store")
    plain = build_store(prepare_datalists(tiny_dataset, check=False), tmp_path / "plain")
    item, ref = store["train"][0], plain["train"][0]
    assert item["id"] == ref["id"] == case["id"] and item["image_dtype"] == "uint16" and ref["image_dtype"] == "uint8"
    image, label = np.load(item["image"]), np.asarray(ChunkedVolume(item["label"]))
    assert image.dtype == np.uint16 and np.array_equal(image, wide)  # 2 bytes per voxel, values untouched
    assert label.dtype == np.uint8 and np.array_equal(label, np.asarray(ChunkedVolume(ref["label"])))
    assert Path(item["image"]).stat().st_size == pytest.approx(2 * wide.size, abs=256)
    assert item["image_stats"] == pytest.approx([wide.mean(dtype=np.float64), wide.std(dtype=np.float64)], rel=1e-9)
    assert all(it["image_dtype"] == "uint8" for it in store["train"][1:] + store["val"])

    before = _store_files(tmp_path / "store")
    again = build_store(prepare_datalists(dataset, check=False), tmp_path / "store")
    assert again == store and _store_files(tmp_path / "store") == before  # a valid uint16 entry is never rebuilt

    norm = NormalizeWithStatsd("image")
    patches = []
    for items in (store, plain):
        ds = StoreDataset(items["train"][:1], mode="ram")
        crop = RandCropByStoredCentresd(["image", "label"], spatial_size=[16, 20, 24], num_samples=3).set_random_state(3)
        patches.append([norm(p) for p in crop(ds[0])])
    assert store_mod.stored_bytes(item) == 3 * wide.size and store_mod.stored_bytes(ref) == 2 * wide.size
    with caplog.at_level(logging.INFO):
        choose_mode(store["train"], "mmap")
    assert "GiB of uint8/uint16 volumes" in caplog.text
    for wide_patch, narrow_patch in zip(*patches, strict=True):
        assert wide_patch["image"].dtype == torch.float32
        torch.testing.assert_close(wide_patch["image"], narrow_patch["image"], atol=1e-4, rtol=1e-4)
        assert torch.equal(wide_patch["label"], narrow_patch["label"])
    whole = [norm(StoredVolumed(["image", "label"])(StoreDataset(s["train"][:1], mode="mmap")[0])) for s in (store, plain)]
    torch.testing.assert_close(whole[0]["image"], whole[1]["image"], atol=1e-4, rtol=1e-4)


def test_image_and_label_dtypes_the_store_refuses(dataset: Path, tmp_path: Path) -> None:
    import tifffile

    lists = prepare_datalists(dataset, check=False)
    img, lab = Path(lists["train"][0]["image"]), Path(lists["train"][0]["label"])
    original = read_volume(img)
    tifffile.imwrite(img, original.astype(np.float32))
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(img))}: float32 image; the store holds uint8 or uint16 images"):
        build_store(lists, tmp_path / "store", workers=1)
    tifffile.imwrite(img, original.astype(np.int32) * 1000)
    with pytest.raises(DatasetError, match=r"int32 values outside uint16 \[\d+, \d+\]; the store holds uint8 or uint16"):
        build_store(lists, tmp_path / "store", workers=1)
    tifffile.imwrite(img, original.astype(np.int16) + 300)  # a NIfTI-style int16 that fits: kept as uint16
    assert np.load(build_store(lists, tmp_path / "store", workers=1)["train"][0]["image"]).dtype == np.uint16

    wrong = read_volume(lab).astype(np.uint16)
    wrong[0, 0, 0] = 300
    tifffile.imwrite(lab, wrong)
    with pytest.raises(DatasetError, match=r"label values \[300\] outside \{0, 1, 2\}"):
        build_store(lists, tmp_path / "store", workers=1)
    with pytest.raises(DatasetError, match=r"uint16 values outside uint8 \[0, 300\]; the store holds uint8 labels"):
        build_store(lists, tmp_path / "store", workers=1, check=False)
