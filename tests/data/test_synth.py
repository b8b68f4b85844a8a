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
