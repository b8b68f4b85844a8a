from __future__ import annotations

import csv

import numpy as np
import pytest

from pipeline.data.synth import SynthConfig, generate_dataset, make_volume
from transforms.io import read_volume


def test_volume_labels_border_and_contrast():
    image, label = make_volume((40, 36, 44), seed=3, scroll=1)
    assert image.dtype == np.uint8 and label.dtype == np.uint8 and image.shape == label.shape == (40, 36, 44)
    assert set(np.unique(label)) == {0, 1, 2}
    for axis in range(3):  # 3-voxel unlabeled border on every face
        for idx in (slice(0, 3), slice(-3, None)):
            sl = [slice(None)] * 3
            sl[axis] = idx
            assert (label[tuple(sl)] == 2).all()
    inner = label[3:-3, 3:-3, 3:-3]
    assert 0.02 < (inner == 1).mean() < 0.5  # thin sheets, not a solid block
    assert image[label == 1].mean() > image[label == 0].mean() + 20  # papyrus brighter than air


def test_dataset_layout_deterministic_and_varied(tmp_path):
    cfg = SynthConfig(n_train=4, n_test=2, shapes=((40, 36, 44), (36, 40, 32)), n_scrolls=2, seed=5)
    a = generate_dataset(tmp_path / "a", cfg)
    b = generate_dataset(tmp_path / "b", cfg)
    rows = list(csv.DictReader(open(a / "train.csv")))
    assert len(rows) == 4 and len({r["scroll_id"] for r in rows}) == 2
    assert len(list(csv.DictReader(open(a / "test.csv")))) == 2
    shapes = set()
    for r in rows:
        img = read_volume(a / "train_images" / f"{r['id']}.tif")
        lab = read_volume(a / "train_labels" / f"{r['id']}.tif")
        assert img.shape == lab.shape and img.dtype == np.uint8
        np.testing.assert_array_equal(img, read_volume(b / "train_images" / f"{r['id']}.tif"))
        shapes.add(img.shape)
    assert len(shapes) == 2 and any(len(set(s)) > 1 for s in shapes)  # non-cubic shapes in the mix
    with pytest.raises(FileExistsError, match="already exists"):
        generate_dataset(a, cfg)


def test_synth_command(tmp_path, capsys):
    from pipeline.cli.main import main

    assert main(["synth", "--out", str(tmp_path / "s"), "--n_train", "2", "--n_test", "1"]) == 0
    assert (tmp_path / "s" / "train.csv").is_file() and len(list((tmp_path / "s" / "test_images").iterdir())) == 1


# sha256 of image bytes + label bytes, computed with the generator as it was before `difficulty` existed
EASY_PINS = {
    ((40, 36, 44), 3, 1): "e8ca32d62e9f17085f23fe2a275fc6ae45eba4ab53fe6e71884a736d5c0f596e",
    ((32, 32, 32), 7, 2): "54930fa21e98ad3a1867279738658188dd487235f37517277621a51c61b5a4a0",
}


@pytest.mark.parametrize(("shape", "seed", "scroll"), list(EASY_PINS))
def test_easy_volumes_unchanged(shape, seed, scroll):
    import hashlib

    image, label = make_volume(shape, seed, scroll)
    assert hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest() == EASY_PINS[(shape, seed, scroll)]


@pytest.fixture(scope="module")
def hard():
    """Two hard 64^3 volumes (image, label, info), and the easy volume of the first seed."""
    volumes = [make_volume((64, 64, 64), seed, scroll=1 + seed % 3, difficulty="hard", return_info=True)
               for seed in (0, 3)]
    return volumes, make_volume((64, 64, 64), 0, scroll=1, return_info=True)


def test_hard_is_deterministic_uint8_and_labelled_like_easy(hard):
    image, label, _ = hard[0][0]
    again, again_label = make_volume((64, 64, 64), 0, scroll=1, difficulty="hard")
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(label, again_label)
    other, _ = make_volume((64, 64, 64), 1, scroll=1, difficulty="hard")
    assert not np.array_equal(image, other)
    shaped, shaped_label = make_volume((40, 36, 44), 3, scroll=1, difficulty="hard")
    assert shaped.dtype == shaped_label.dtype == np.uint8 and shaped.shape == shaped_label.shape == (40, 36, 44)
    for volume, lab in ((image, label), (shaped, shaped_label)):
        assert set(np.unique(lab)) == {0, 1, 2}
        assert (lab[:3] == 2).all() and (lab[:, :, -3:] == 2).all()
        assert 0.05 < (lab[3:-3, 3:-3, 3:-3] == 1).mean() < 0.5
        assert volume[lab == 1].mean() > volume[lab == 0].mean() + 20


def test_hard_wraps_come_1_to_3_voxels_apart_and_touch_only_where_they_merge(hard):
    for _, label, info in hard[0]:
        summary = info.summary(label)
        # sheet voxels of two different wraps with 1, 2 and 3 background voxels between them
        assert {1, 2, 3} <= set(summary["gaps"]) and summary["min_gap"] == 1
        # merged: voxels of different wraps side by side (one component in the label), only where the generator
        # squeezed the wraps to touching: centres a thickness apart, give or take the sampling of oblique sheets
        # (the unsqueezed gap, pitch - thickness, is 4 voxels or more)
        assert summary["touching"] > 100
        wrap = np.where(label == 1, info.wrap, 0)
        for axis in range(3):
            w = np.moveaxis(wrap, axis, 0)
            side_by_side = (w[:-1] > 0) & (w[1:] > 0) & (w[:-1] != w[1:])
            squeezed = np.moveaxis(info.spacing - info.thickness, axis, 0)[:-1]
            assert (squeezed[side_by_side] < 2).all()
    _, easy_label, easy_info = hard[1]
    assert easy_info.summary(easy_label)["min_gap"] >= 5


def test_hard_flap_crosses_several_wraps(hard):
    import cc3d

    for _, label, info in hard[0]:
        assert info.summary(label)["crossing"] > 100
        components = cc3d.connected_components(label == 1, connectivity=26)
        flap = info.flap & (label == 1)
        for c in np.unique(components[flap]):  # each piece of the flap joins the wraps it crosses into one
            if (components[flap] == c).sum() > 200:
                assert len(np.unique(info.wrap[(components == c) & (info.wrap > 0)])) >= 2


def test_hard_thickness_varies_along_the_sheet(hard):
    from scipy import ndimage

    for _, label, info in hard[0]:
        low, high = info.summary(label)["thickness"]
        assert low < 2.0 and high > 5.0
        sheet = label == 1
        plain = sheet & ~info.close & ~info.flap
        depth = ndimage.distance_transform_edt(sheet)  # measured on the label: thick parts are deeper
        thin_q, thick_q = np.percentile(info.thickness[plain], [25, 75])
        assert depth[plain & (info.thickness >= thick_q)].mean() > depth[plain & (info.thickness <= thin_q)].mean() + 0.25
    _, easy_label, easy_info = hard[1]
    low, high = easy_info.summary(easy_label)["thickness"]
    assert low == high


def test_hard_air_slits_are_dark_and_labelled_papyrus(hard):
    for image, label, info in hard[0]:
        slit = info.air_gap & (label != 2)
        assert slit.sum() > 50 and (label[slit] == 1).all()  # one labelled layer across the slit
        intact = (label == 1) & ~info.air_gap & ~info.close & ~info.flap & (info.thickness >= 3.5)
        assert image[slit].mean() < image[intact].mean() - 12


def _intensity_trend(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Least-squares gradient of the background's intensity, as the change from the centre to a face."""
    where = np.nonzero(label == 0)
    half = (np.array(image.shape) - 1) / 2
    coords = [(w - h) / h for w, h in zip(where, half)]
    design = np.stack([np.ones_like(coords[0]), *coords], 1)
    return np.linalg.lstsq(design, image[where].astype(float), rcond=None)[0][1:]


def test_hard_intensity_drifts_across_the_volume(hard):
    for image, label, info in hard[0]:
        trend = _intensity_trend(image, label)
        assert 0.2 <= info.drift_amplitude <= 0.35
        assert np.linalg.norm(trend) > 5  # grey levels, centre to face
        assert trend @ np.array(info.drift) / np.linalg.norm(trend) > 0.8  # along the direction generated
    easy_image, easy_label, easy_info = hard[1]
    assert np.linalg.norm(_intensity_trend(easy_image, easy_label)) < 2 and easy_info.drift_amplitude == 0


def test_hard_unlabeled_blocks_sit_where_wraps_are_closest(hard):
    close = everywhere = 0.0
    for _, label, info in hard[0]:
        summary = info.summary(label)
        close += summary["close_unlabeled"]
        everywhere += summary["all_unlabeled"]
        assert (label[info.close & (label != 2)] == 1).all() and (label == 1)[info.close].any()
    assert close > 2 * everywhere


def test_summary_counts_gaps_and_touching_wraps():
    from pipeline.data.synth import SynthInfo

    label = np.zeros((1, 1, 12), np.uint8)
    wrap = np.zeros((1, 1, 12), np.int16)
    for i, w in ((0, 1), (3, 2), (4, 3), (8, 3)):  # 1 | 0 0 | 2 3 | 0 0 0 | 3
        label[0, 0, i], wrap[0, 0, i] = 1, w
    none = np.zeros(label.shape, bool)
    ones = np.ones(label.shape, np.float32)
    info = SynthInfo("hard", 12.0, wrap, none, ones, ones, none, none)
    summary = info.summary(label)
    assert summary["gaps"] == {2: 1} and summary["min_gap"] == 2  # 3 then 3 is one wrap: no gap
    assert summary["touching"] == 1


def test_difficulty_is_checked_with_one_line(tmp_path, capsys):
    from pipeline.cli.main import main
    from pipeline.utils.errors import SettingsError

    with pytest.raises(SettingsError, match="use easy or hard"):
        SynthConfig(difficulty="medium")
    with pytest.raises(SettingsError, match="'Hard'"):
        make_volume((16, 16, 16), 0, difficulty="Hard")
    assert main(["synth", "--out", str(tmp_path / "s"), "--difficulty", "medium"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --difficulty 'medium': not a difficulty of the synthetic scrolls; use easy or hard"]
    assert not (tmp_path / "s").exists()


def test_synth_command_writes_hard_scrolls(tmp_path):
    from pipeline.cli.main import main

    out = tmp_path / "s"
    assert main(["synth", "--out", str(out), "--n_train", "1", "--n_test", "1", "--difficulty", "hard"]) == 0
    with open(out / "train.csv") as f:
        (row,) = list(csv.DictReader(f))
    seeds = np.random.default_rng(0).integers(0, 2**31 - 1, size=2)
    image, label = make_volume(SynthConfig().shapes[0], int(seeds[0]), int(row["scroll_id"]), difficulty="hard")
    np.testing.assert_array_equal(read_volume(out / "train_images" / f"{row['id']}.tif"), image)
    np.testing.assert_array_equal(read_volume(out / "train_labels" / f"{row['id']}.tif"), label)
