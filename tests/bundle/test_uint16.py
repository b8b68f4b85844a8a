"""A dataset mixing uint8 and uint16 volumes (full-resolution scroll CT is often uint16) through the bundle's
training (the store keeps the uint16 images as uint16) and inference, and through ``python -m pipeline predict``.

Each uint16 volume is its uint8 source x 100 + 1000: z-scoring undoes that, so a uint16 test volume must be
predicted as its uint8 source is."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pipeline.data import datalist as data
from pipeline.data.chunked import ChunkedVolume
from pipeline.inference.submission import check_submission
from tests._bad_inputs import QUIET_TRAIN, run_cli
from tests.conftest import CONFIGS, TINY_INFER, TINY_TRAIN, cli_args
from transforms.io import read_volume, read_volume_shape


def _write_uint16(path: Path, source: Path) -> np.ndarray:
    arr = read_volume(source).astype(np.uint16) * 100 + 1000
    tifffile.imwrite(path, arr, compression="lzw", photometric="minisblack")
    return arr


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory) -> dict:
    """One training run (1 epoch, validated) and one inference run on the mixed dataset, shared by the tests."""
    root = tmp_path_factory.mktemp("uint16")
    ds = Path(shutil.copytree(tiny_dataset, root / "ds"))
    lists = data.prepare_datalists(ds, check=False)
    wide = [lists["train"][0], lists["val"][0]]  # one uint16 volume on each side of the split
    for case in wide:
        _write_uint16(Path(case["image"]), Path(case["image"]))
    label = Path(wide[0]["label"])
    tifffile.imwrite(label, read_volume(label).astype(np.uint16))  # a uint16 label of 0/1/2 is cast to uint8
    source = data.test_datalist(ds)[0]
    wide_id = f"{source['id']}16"
    _write_uint16(ds / "test_images" / f"{wide_id}.tif", Path(source["image"]))
    with open(ds / "test.csv", "a") as f:
        f.write(f"{wide_id},{source.get('scroll_id', '')}\n")

    paths = {"dataset_dir": str(ds), "output_dir": str(root / "out"), "ckpt_dir": str(root / "models")}
    command = [sys.executable, "-m", "monai.bundle", "run"]
    train = {**TINY_TRAIN, **QUIET_TRAIN, **paths, "epochs": 1, "val_interval": 1}
    rc, _, train_log = run_cli([*command, "training", "--config_file", str(CONFIGS / "train.yaml"), *cli_args(train)], 600)
    assert rc == 0, train_log[-3000:]
    infer = {**TINY_INFER, **paths, "overlays": False}
    rc, _, infer_log = run_cli([*command, "inference", "--config_file", str(CONFIGS / "inference.yaml"), *cli_args(infer)], 600)
    assert rc == 0, infer_log[-3000:]
    return {"root": root, "ds": ds, "wide": [c["id"] for c in wide], "source": source["id"], "wide_test": wide_id,
            "train_log": train_log}


def test_training_stores_uint16_and_validates(trained: dict) -> None:
    store = trained["root"] / "out" / "store"
    dtypes = {}
    for meta in store.glob("*.json"):
        stem = meta.with_suffix("")
        case = stem.name.rsplit("-", 1)[0]
        dtypes[case] = (np.load(f"{stem}.image.npy", mmap_mode="r").dtype, ChunkedVolume(f"{stem}.label.chunks").dtype)
    assert {c for c, (img, _) in dtypes.items() if img == np.uint16} == set(trained["wide"])
    assert {img for img, _ in dtypes.values()} == {np.dtype(np.uint8), np.dtype(np.uint16)}
    assert {lab for _, lab in dtypes.values()} == {np.dtype(np.uint8)}
    assert (trained["root"] / "models" / "model.pt").is_file()  # written by the validation (best model)
    assert re.search(r"val_dice[^\n]*\d", trained["train_log"]), trained["train_log"][-3000:]
    assert "GiB of uint8/uint16 volumes" in trained["train_log"]


def test_inference_predicts_uint16_as_its_uint8_source(trained: dict) -> None:
    ds, out = trained["ds"], trained["root"] / "out"
    expected = {c["id"]: read_volume_shape(c["image"]) for c in data.test_datalist(ds)}
    assert trained["wide_test"] in expected
    check_submission(out / "submission.zip", expected)
    wide = read_volume(out / "predictions" / f"{trained['wide_test']}.tif")
    narrow = read_volume(out / "predictions" / f"{trained['source']}.tif")
    assert wide.dtype == np.uint8 and wide.shape == expected[trained["wide_test"]]
    assert (wide == narrow).mean() > 0.999


def test_streaming_predict_reads_uint16(trained: dict, tmp_path: Path, capsys) -> None:
    from pipeline.cli.main import main

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(trained["ds"] / "test_images" / f"{trained['source']}.tif", inputs / "narrow.tif")
    shutil.copy(trained["ds"] / "test_images" / f"{trained['wide_test']}.tif", inputs / "wide.tif")
    assert read_volume(inputs / "wide.tif").dtype == np.uint16
    root = logging.getLogger()
    saved, root.handlers = root.handlers, []  # the command sets up console logging on a bare root
    try:
        rc = main(["predict", "--input", str(inputs), "--output", str(tmp_path / "out"), "--model_path",
                   str(trained["root"] / "models" / "model.pt"), "--block_size", "32", "--chunk_size", "16"])
    finally:
        root.handlers = saved
    assert rc == 0, capsys.readouterr().err[-3000:]
    masks = {name: zarr.open_group(tmp_path / "out" / f"{name}.zarr", mode="r")["mask"][:] for name in ("narrow", "wide")}
    assert masks["wide"].shape == read_volume_shape(inputs / "wide.tif")
    assert (masks["wide"] == masks["narrow"]).mean() > 0.999
    manifest = json.loads((tmp_path / "out" / "wide.zarr" / "predict_manifest.json").read_text())
    assert manifest["input"]["dtype"] == "uint16"

