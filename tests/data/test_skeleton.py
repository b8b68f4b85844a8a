"""Skeleton recall loss: the tubed skeleton built once per training volume in the store (pipeline.data.store), cut with
the label's window (transforms.crop), augmented with it as the target's second channel, the loss term
(pipeline.training.losses) and a training through the real train.yaml."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.utils import set_determinism
from skimage.morphology import dilation, skeletonize

from pipeline.data.chunked import ChunkedVolume
from pipeline.data.datalist import prepare_datalists
from pipeline.data.store import StoreDataset, build_store, tubed_skeleton
from pipeline.training.losses import MaskedDiceBCELoss
from tests.conftest import CONFIGS, TINY_TRAIN
from transforms.crop import RandCropByStoredCentresd

QUIET = {"training_curves": False, "tensorboard_preview": False, "monitor_resources": False, "val_score": False}


@pytest.fixture()
def dataset(tiny_dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


def _mtimes(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.suffix in (".npy", ".chunks", ".json")}


def test_tubed_skeleton_is_the_papers_on_the_surface_only() -> None:
    label = np.zeros((24, 24, 28), dtype=np.uint8)
    label[2:20, 2:5, 2:26] = 1  # a thick sheet with a hole (Lee's thinning may erase a plate without one)
    label[8:12, 2:5, 8:12] = 0
    label[2:20, 2:5, 20:26] = 2  # its end unlabeled: background for the skeleton
    surface = label == 1
    expect = dilation(dilation(skeletonize(surface))) & surface  # the Skeleton Recall code, skimage's own footprint
    got = tubed_skeleton(label)
    assert got.dtype == np.uint8 and got.any() and np.array_equal(got.astype(bool), expect)
    assert not got[label != 1].any()
    assert not tubed_skeleton(np.full((5, 5, 5), 2, np.uint8)).any()


def test_skeleton_built_once_for_existing_entries_and_broken_one_rebuilt(dataset: Path, tmp_path: Path, caplog) -> None:
    lists = prepare_datalists(dataset, check=False)
    cache = tmp_path / "store"
    plain = build_store(lists, cache)
    assert "skeleton" not in plain["train"][0]
    assert not any(json.loads(m.read_text())["skeleton"] for m in cache.glob("*.json"))
    before = _mtimes(cache)
    labels = {it["id"]: np.asarray(ChunkedVolume(it["label"])) for it in plain["train"]}

    with caplog.at_level(logging.INFO):
        store = build_store(lists, cache, skeletons=["train"])
    after = _mtimes(cache)
    rewritten = {Path(it["label"]).name for it in store["train"]} | {Path(it["label"]).name.replace(".label.chunks", ".json") for it in store["train"]}
    assert {n for n in before if before[n] != after[n]} == rewritten  # image and centres untouched
    assert all("skeleton" not in it for it in store["val"])  # validation never sees it
    for item in store["train"]:
        packed = np.asarray(ChunkedVolume(item["label"]))
        assert item["skeleton"] == item["label"]  # one file, two fields
        assert np.array_equal(packed & 3, labels[item["id"]])  # the label's values untouched
        assert np.array_equal(packed >> 2, tubed_skeleton(labels[item["id"]]))
        ds = StoreDataset([item], mode="mmap")
        assert np.array_equal(np.asarray(ds[0]["label"]), labels[item["id"]])
        assert np.array_equal(np.asarray(ds[0]["skeleton"]), packed >> 2)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        build_store(lists, cache, skeletons=["train"])
    assert "0 built by this process" in caplog.text and _mtimes(cache) == after  # reused, nothing touched

    # a store built without the skeleton reads the packed files as plain labels
    again = build_store(lists, cache)
    assert np.array_equal(np.asarray(StoreDataset(again["train"][:1], mode="ram")[0]["label"]), labels[again["train"][0]["id"]])

    broken = Path(store["train"][0]["label"])
    broken.write_bytes(broken.read_bytes()[:-10])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rebuilt = build_store(lists, cache, skeletons=["train"])
    assert f"rebuilding {broken}: truncated" in caplog.text
    assert np.array_equal(np.asarray(ChunkedVolume(rebuilt["train"][0]["label"])) >> 2, tubed_skeleton(labels[rebuilt["train"][0]["id"]]))


def test_crop_gives_the_skeleton_the_labels_window(dataset: Path, tmp_path: Path) -> None:
    store = build_store(prepare_datalists(dataset, check=False), tmp_path / "store", skeletons=["train"])
    data = StoreDataset(store["train"], mode="mmap")[0]
    crop = RandCropByStoredCentresd(["image", "label", "skeleton"], spatial_size=[48, 20, 24], ratios=[0.3, 0.7],
                                    num_samples=4, pad_values=[0, 2, 0])
    crop.set_random_state(1)
    for sample, window in zip(crop(data), crop.cropper.windows, strict=True):
        region = tuple(slice(a, b) for a, b in window)
        z = window[0][1] - window[0][0]
        pad = (48 - z) // 2  # the volumes are shorter than 48 along Z: padded, skeleton with 0
        assert np.array_equal(sample["skeleton"][0, pad:pad + z].numpy(), data["skeleton"][region])
        assert np.array_equal(sample["label"][0, pad:pad + z].numpy(), data["label"][region])
        assert (sample["skeleton"][0, :pad] == 0).all() and (sample["label"][0, :pad] == 2).all()


def _parser(dataset: Path, root: Path, **extra) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({**TINY_TRAIN, **QUIET, "dataset_dir": str(dataset), "output_dir": str(root / "out"),
                   "cache_dir": str(root / "store"), "ckpt_dir": str(root / "models"), "skeleton_recall_weight": 1.0, **extra})
    parser.get_parsed_content("imports")
    return parser


@pytest.mark.parametrize("on_device", [False, True])
def test_augmentation_moves_the_skeleton_with_the_label(dataset: Path, tmp_path: Path, on_device: bool) -> None:
    """The skeleton lies on the surface; a flip or rotation applied to one channel and not the other breaks that."""
    parser = _parser(dataset, tmp_path, augment_on_device=on_device, num_samples=4)
    set_determinism(3)
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    # on the device's path the loader leaves the target uint8 (the device casts it); else float32 from the loader
    assert torch.as_tensor(batch["label"]).dtype == (torch.uint8 if on_device else torch.float32)
    _, target = parser.get_parsed_content("train#prepare_batch")(batch, torch.device("cpu"))
    assert target.shape[1:] == (2, 32, 32, 32) and target.dtype == torch.float32
    label, skeleton = target[:, 0], target[:, 1]
    assert skeleton.sum() > 0 and torch.equal(skeleton * (label == 1), skeleton)


def test_loss_term_zero_on_the_skeleton_grows_when_missed_and_ignores_label_2() -> None:
    torch.manual_seed(0)
    label = torch.randint(0, 2, (2, 1, 8, 8, 8)).float()
    label[:, :, :2] = 2
    skeleton = (label == 1).float() * (torch.rand_like(label) < 0.3)
    skeleton[:, :, 0] = 1.0  # a skeleton voxel on unlabeled voxels (a coarse deep-supervision scale) must not count
    target = torch.cat([label, skeleton], dim=1)
    base, with_skeleton = MaskedDiceBCELoss(), MaskedDiceBCELoss(skeleton_recall_weight=1.0)
    on_skeleton = torch.where(skeleton > 0, 30.0, -30.0)
    term = lambda logits: (with_skeleton(logits, target) - base(logits, label)).item()  # noqa: E731
    assert term(on_skeleton) == pytest.approx(0.0, abs=1e-5)  # the skeleton covered: recall 1
    half = on_skeleton.clone()
    half[skeleton.bool() & (torch.rand_like(skeleton) < 0.5)] = -30.0
    assert 0.2 < term(half) < 0.8  # part of it missed
    assert term(-on_skeleton.abs()) == pytest.approx(1.0, abs=1e-4)  # all of it missed
    assert MaskedDiceBCELoss(skeleton_recall_weight=0.5)(-on_skeleton.abs(), target).item() == pytest.approx(
        base(-on_skeleton.abs(), label).item() + 0.5, abs=1e-4)

    logits = torch.randn(2, 1, 8, 8, 8, requires_grad=True)
    with_skeleton(logits, target).backward()
    assert logits.grad[label == 2].abs().max() == 0 and logits.grad[skeleton.bool() & (label == 1)].abs().min() > 0
    with pytest.raises(ValueError, match="label and skeleton channels"):
        with_skeleton(logits, label)
    with pytest.raises(ValueError, match="one label channel"):
        base(logits, target)


def test_one_epoch_with_skeleton_recall_through_train_yaml(dataset: Path, tmp_path: Path) -> None:
    parser = _parser(dataset, tmp_path, epochs=1)
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.loss_function.loss.skeleton_recall_weight == 1.0  # inside the deep-supervision wrapper
    targets, losses = [], []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine: Engine) -> None:
        targets.append(engine.state.output["label"].shape)
        losses.append(engine.state.output["loss"].item())

    trainer.run()
    assert targets and all(t[1] == 2 for t in targets) and all(np.isfinite(losses))
    with_skeleton = [m for m in (tmp_path / "store").glob("*.json") if json.loads(m.read_text())["skeleton"]]
    assert len(with_skeleton) == len(parser.get_parsed_content("datalists")["train"])
    evaluator = parser.get_parsed_content("validate#evaluator")
    assert all(out["label"].shape[0] == 1 for out in evaluator.state.output)  # validation sees the label only
    assert (tmp_path / "models" / "model.pt").is_file()
