from __future__ import annotations

import zipfile

import numpy as np
import pytest
import tifffile

from pipeline.inference.submission import (
    SubmissionError,
    check_submission,
    write_submission_zip,
)
from transforms.io import write_volume

SHAPES = {"101": (5, 6, 7), "202": (4, 6, 5)}


@pytest.fixture
def preds(tmp_path):
    d = tmp_path / "pred"
    for case, shape in SHAPES.items():
        write_volume(d / f"{case}.tif", np.ones(shape, np.uint8))
    return d


def test_write_and_check(preds, tmp_path):
    out = write_submission_zip(preds, tmp_path / "submission.zip", SHAPES)
    check_submission(out, SHAPES)
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == ["101.tif", "202.tif"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred", "submission.zip"]  # no temporary left


def test_missing_prediction_leaves_no_zip(preds, tmp_path):
    with pytest.raises(SubmissionError, match=r"303\.tif: prediction for test case 303 not written"):
        write_submission_zip(preds, tmp_path / "submission.zip", {**SHAPES, "303": (2, 2, 2)})
    assert not (tmp_path / "submission.zip").exists() and not list(tmp_path.glob(".submission*"))


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in members.items():
            p = path.parent / name.replace("/", "_")
            tifffile.imwrite(p, arr, photometric="minisblack")
            zf.write(p, arcname=name)
    return path


@pytest.mark.parametrize(
    "members, match",
    [
        ({"101.tif": np.zeros((5, 6, 7), np.uint8)}, r"missing=\['202'\]"),
        ({"101.tif": np.zeros((5, 6, 7), np.uint8), "202.tif": np.zeros((4, 6, 5), np.uint8), "9.tif": np.zeros((1, 1, 1), np.uint8)}, r"extra=\['9'\]"),
        ({"101.tif": np.zeros((5, 6, 6), np.uint8), "202.tif": np.zeros((4, 6, 5), np.uint8)}, r"101\.tif: got uint8 \(5, 6, 6\), expected uint8 \(5, 6, 7\)"),
        ({"101.tif": np.zeros((5, 6, 7), np.uint16), "202.tif": np.zeros((4, 6, 5), np.uint8)}, r"101\.tif: got uint16"),
        ({"a/101.tif": np.zeros((5, 6, 7), np.uint8), "b/101.tif": np.zeros((5, 6, 7), np.uint8), "202.tif": np.zeros((4, 6, 5), np.uint8)}, r"duplicated=\['101'\]"),
    ],
)
def test_check_rejects_bad_submissions(tmp_path, members, match):
    with pytest.raises(SubmissionError, match=match):
        check_submission(_zip(tmp_path / "s.zip", members), SHAPES)


def test_check_rejects_corrupt_zip(tmp_path):
    bad = tmp_path / "s.zip"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SubmissionError, match="not a readable zip"):
        check_submission(bad, SHAPES)


def test_earlier_runs_zip_and_temp_files_are_removed_at_start(tmp_path):
    from pipeline.inference.submission import SubmissionWriter

    pred, zip_path = tmp_path / "predictions", tmp_path / "submission.zip"
    pred.mkdir()
    (pred / ".1.tif.abc.tmp").write_bytes(b"partial")
    (pred / "1.tif").write_bytes(b"kept")  # overwritten by this run's prediction
    zip_path.write_bytes(b"old zip")
    (tmp_path / ".submission.zip.tmp").write_bytes(b"partial")
    SubmissionWriter(pred, zip_path, []).remove_stale()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["1.tif", "predictions"]
