from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.data import datalist as data
from pipeline.data.datalist import (
    DatasetError,
    check_test_datalist,
    prepare_datalists,
    split_datalist,
    train_datalist,
)
from transforms.io import read_volume, read_volume_shape


@pytest.fixture
def dataset(tiny_dataset, tmp_path) -> Path:
    """A private copy of the tiny dataset that a test may break."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "ds"))


def test_datalist_from_csv(tiny_dataset):
    cases = train_datalist(tiny_dataset)
    assert len(cases) == 5
    for c in cases:
        assert Path(c["image"]).is_file() and Path(c["label"]).is_file() and c["scroll_id"] in {"1", "2"}
    assert len(data.test_datalist(tiny_dataset)) == 2


def test_datalist_from_folders_without_csv(dataset):
    (dataset / "train.csv").unlink()
    (dataset / "test.csv").unlink()
    cases = train_datalist(dataset)
    assert len(cases) == 5 and all("scroll_id" not in c for c in cases)
    from torch.utils.data import default_collate

    default_collate(cases[:2])  # a DataLoader must batch the case dicts (a None field would not collate)
    assert len(data.test_datalist(dataset)) == 2


def _cases(n, scrolls=None):
    return [{"id": str(i), **({} if scrolls is None else {"scroll_id": str(scrolls[i])})} for i in range(n)]


def test_split_by_scroll_keeps_scrolls_whole():
    cases = _cases(12, scrolls=[i % 3 for i in range(12)])
    train, val = split_datalist(cases, val_fraction=0.2)
    assert {c["scroll_id"] for c in train}.isdisjoint({c["scroll_id"] for c in val})
    assert len(train) + len(val) == 12 and val


def test_split_by_case_and_folds_cover_everything():
    cases = _cases(10)
    train, val = split_datalist(cases, val_fraction=0.3, seed=1)
    assert len(val) == 3 and {c["id"] for c in train}.isdisjoint({c["id"] for c in val})
    seen = []
    for fold in range(5):
        _, v = split_datalist(cases, fold=fold, num_folds=5)
        seen += [c["id"] for c in v]
    assert sorted(seen) == sorted(c["id"] for c in cases)  # each case validated in exactly one fold
    with pytest.raises(DatasetError, match="fold=5"):
        split_datalist(cases, fold=5, num_folds=5)


def test_prepare_datalists_on_good_data(tiny_dataset):
    lists = prepare_datalists(tiny_dataset, val_fraction=0.2)
    assert lists["train"] and lists["val"]
    assert {c["scroll_id"] for c in lists["train"]}.isdisjoint({c["scroll_id"] for c in lists["val"]})


# ---- bad input: one clear message naming the file and the problem ----


def _first(dataset: Path, folder: str) -> Path:
    return sorted((dataset / folder).iterdir())[0]


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"nope: dataset folder not found"):
        prepare_datalists(tmp_path / "nope")


def test_image_without_label(dataset):
    lab = _first(dataset, "train_labels")
    lab.unlink()
    with pytest.raises(DatasetError, match=rf"{lab.stem}\.tif: image has no label"):
        prepare_datalists(dataset)


def test_shapes_differ(dataset):
    lab = _first(dataset, "train_labels")
    tifffile.imwrite(lab, read_volume(lab)[:-1])
    with pytest.raises(DatasetError, match=rf"{lab.name}: label shape .* differs from image shape"):
        prepare_datalists(dataset)


def test_2d_tiff(dataset):
    img = _first(dataset, "train_images")
    tifffile.imwrite(img, np.zeros((32, 32), np.uint8))
    with pytest.raises(DatasetError, match=rf"{img.name}: expected a 3D volume"):
        prepare_datalists(dataset)


def test_label_values_outside_range(dataset):
    lab = _first(dataset, "train_labels")
    arr = read_volume(lab)
    arr[5, 5, 5] = 7
    tifffile.imwrite(lab, arr)
    with pytest.raises(DatasetError, match=rf"{lab.name}: label values \[7\] outside"):
        prepare_datalists(dataset)


def test_empty_test_folder(dataset):
    for p in (dataset / "test_images").iterdir():
        p.unlink()
    (dataset / "test.csv").unlink()
    with pytest.raises(DatasetError, match="test_images: no test volumes"):
        data.test_datalist(dataset)


def test_unreadable_file(dataset):
    img = _first(dataset, "train_images")
    img.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DatasetError, match=rf"{img.name}: cannot read"):
        prepare_datalists(dataset)
    test_img = _first(dataset, "test_images")
    test_img.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=rf"{test_img.name}: cannot read"):
        check_test_datalist(data.test_datalist(dataset))


def test_main_job_reports_bad_input_in_one_line(dataset, capsys):
    from pipeline.cli.main import main

    lab = _first(dataset, "train_labels")
    lab.unlink()
    assert main(["--dataset_dir", str(dataset), "--output_dir", str(dataset / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "image has no label" in err[0]
    assert not (dataset / "out").exists()  # stopped before training started


def test_float_labels_name_the_float_values(dataset):
    from tests._bad_inputs import CASES

    CASES["float labels 0.5/1.5/2.5"](dataset)
    with pytest.raises(DatasetError, match=r"label values \[0.5, 1.5, 2.5\] outside \{0, 1, 2\} \(float labels"):
        prepare_datalists(dataset)


def test_volume_below_minimum_size_is_refused(dataset):
    from tests._bad_inputs import CASES

    CASES["2x3x3 volume"](dataset)
    with pytest.raises(DatasetError, match=r"shape \(2, 3, 3\) is too small: at least 16 voxels along every axis"):
        prepare_datalists(dataset)


def test_truncated_image_is_called_truncated(dataset):
    img = _first(dataset, "train_images")
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=rf"{img.name}: truncated or damaged TIFF"):
        prepare_datalists(dataset)


def test_listed_id_without_file_names_the_csv(dataset):
    with open(dataset / "train.csv", "a") as f:
        f.write("9999,1\n")
    with pytest.raises(DatasetError, match=r"train\.csv: case 9999 is listed but its image .*9999\.tif is not there"):
        prepare_datalists(dataset)


def test_load_image_never_falls_back_to_another_reader(dataset):
    """MONAI's LoadImage tries its other readers when the given one raises; PIL then reads one 2D page."""
    from monai.transforms import LoadImaged

    from transforms.io import TiffReader, VolumeError

    img = _first(dataset, "test_images")
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match=rf"{img.name}: truncated or damaged TIFF"):
        LoadImaged("image", reader=TiffReader())({"image": str(img)})


def test_impossible_settings_are_refused(tiny_dataset):
    from pipeline.data.checks import check_training_settings
    from pipeline.utils.errors import SettingsError

    cases = train_datalist(tiny_dataset)
    check_training_settings([32, 32, 32], [2, 2], cases)
    with pytest.raises(SettingsError, match=r"patch_size \[60, 60, 60\]: every size must be a multiple of 8.*\[56, 56, 56\]"):
        check_training_settings([60, 60, 60], [2, 2, 2], cases)
    with pytest.raises(SettingsError, match=r"larger than every training volume along axis \[0\]"):
        check_training_settings([64, 32, 32], [2, 2], cases)


def test_training_settings_check_names_a_2d_image(dataset):
    """The patch check reads header shapes before any volume is decoded: a 2D image is named, not an IndexError."""
    from pipeline.data.checks import check_training_settings
    from tests._bad_inputs import CASES

    CASES["2D training image"](dataset)
    (img,) = [c["image"] for c in train_datalist(dataset) if read_volume_shape(c["image"]) == (32, 32)]
    with pytest.raises(DatasetError, match=rf"^{img}: expected a 3D volume \(Z, Y, X\), got an array of shape \(32, 32\)$"):
        check_training_settings([32, 32, 32], [2, 2], train_datalist(dataset))
