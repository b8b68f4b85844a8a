"""Continue a run from a read-only copy of its checkpoints (resume_from) and start one from a model's weights
(init_from), through the real train.yaml on tiny data."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from pipeline.model.networks import build_network
from pipeline.model.plans import make_plans, pack_model
from pipeline.training.checkpoint import (
    FINAL_NAME,
    checkpoint_name,
    find_latest_checkpoint,
)
from pipeline.training.runs import RUN_RECORD
from tests.conftest import CONFIGS, REPO, TINY_TRAIN, cli_args

QUIET = {"tensorboard_preview": False, "monitor_resources": False, "val_score": False}


def _parser(dataset: Path, root: Path, **extra) -> ConfigParser:
    """train.yaml on the tiny data, laid out as a Kaggle session's /kaggle/working: root/models, root/outputs."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({**TINY_TRAIN, **QUIET, "training_curves": False, "dataset_dir": str(dataset),
                   "output_dir": str(root / "outputs"), "cache_dir": str(root / "store"),
                   "ckpt_dir": str(root / "models"), **extra})
    parser.get_parsed_content("imports")
    return parser


def _train(parser: ConfigParser, at_start: dict | None = None) -> dict[int, float]:
    """Run the bundle; the loss of every iteration, and (into ``at_start``) the state the run started from."""
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    network, optimizer = parser.get_parsed_content("network"), parser.get_parsed_content("optimizer")
    losses: dict[int, float] = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: losses.__setitem__(e.state.iteration, e.state.output["loss"].item()))
    if at_start is not None:  # attached after the checkpointer: sees what it restored or loaded

        @trainer.on(Events.STARTED)
        def _record(engine) -> None:
            at_start.update(epoch=engine.state.epoch, iteration=engine.state.iteration,
                            optimizer=optimizer.state_dict(),
                            weights={k: v.clone() for k, v in network.state_dict().items()})

    parser.get_parsed_content("run")
    return losses


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


def _read_only(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="module")
def session1(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Session 1: 2 epochs (with curves) into a Kaggle-like working folder, then a read-only copy of it (what the
    next session sees under /kaggle/input); and the uninterrupted 3-epoch run session 2 must reproduce."""
    root = tmp_path_factory.mktemp("session1")
    first = _train(_parser(tiny_dataset, root, training_curves=True))
    shutil.rmtree(root / "store")  # on Kaggle the recipe keeps it in /tmp
    inputs = Path(shutil.copytree(root, tmp_path_factory.mktemp("input") / "session1", symlinks=True))
    _read_only(inputs)
    reference = _parser(tiny_dataset, tmp_path_factory.mktemp("reference"), epochs=3)
    return {"input": inputs, "losses": first, "reference": _train(reference), "reference_net": _weights(reference)}


def _weights(parser: ConfigParser) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in parser.get_parsed_content("network").state_dict().items()}


def test_resume_from_a_read_only_copy_is_exact_and_continues_the_run_folder(
    tiny_dataset: Path, tmp_path: Path, session1: dict, caplog: pytest.LogCaptureFixture
) -> None:
    source = session1["input"] / "models"
    before = _snapshot(session1["input"])
    name = (source / RUN_RECORD).read_text().strip()
    session2 = _parser(tiny_dataset, tmp_path, epochs=3, resume_from=str(source), training_curves=True)
    with caplog.at_level(logging.INFO):
        losses = _train(session2)
    ckpt = tmp_path / "models"
    assert f"Resuming from {ckpt / FINAL_NAME} copied from {source / FINAL_NAME}" in caplog.text
    assert f"Resumed from {ckpt / FINAL_NAME} at epoch 2" in caplog.text
    assert sorted(session1["losses"]) == [1, 2, 3, 4] and sorted(losses) == [5, 6]  # epoch 3 only
    assert session1["losses"] | losses == session1["reference"]  # bit-equal to the uninterrupted run
    network = _weights(session2)
    assert all(torch.equal(network[k], v) for k, v in session1["reference_net"].items())
    assert _snapshot(session1["input"]) == before  # the source is only read

    # the run record names the run; its folder was found beside the checkpoints and continued here
    run = tmp_path / "outputs" / "runs" / name
    assert (ckpt / RUN_RECORD).read_text().strip() == name and (tmp_path / "outputs" / "latest_run").resolve() == run
    history = json.loads((run / "training_history.json").read_text())["epochs"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert (ckpt / "model.pt").is_file() and run.stat().st_mode & stat.S_IWUSR  # a writable copy

    # session 2 run again: ckpt_dir is further than the source, so nothing goes back in time
    caplog.clear()
    again = _parser(tiny_dataset, tmp_path, epochs=3, resume_from=str(source))
    with caplog.at_level(logging.INFO):
        assert _train(again) == {}
    assert "nothing copied from resume_from" in caplog.text
    assert f"Resumed from {ckpt / FINAL_NAME} at epoch 3" in caplog.text
    assert _snapshot(session1["input"]) == before


def test_resume_from_one_file_without_its_run_folder(tiny_dataset: Path, tmp_path: Path, session1: dict,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A periodic checkpoint copied alone (no run_name.txt, no model.pt beside it): a new run folder, same losses."""
    lone = tmp_path / "lone"
    lone.mkdir()
    periodic = checkpoint_name(2, 4)
    shutil.copyfile(session1["input"] / "models" / periodic, lone / "last.pt")
    with caplog.at_level(logging.INFO):
        losses = _train(_parser(tiny_dataset, tmp_path, epochs=3, resume_from=str(lone / "last.pt")))
    assert f"Resuming from {tmp_path / 'models' / periodic} copied from {lone / 'last.pt'}" in caplog.text
    assert "the run continues in a new run folder" in caplog.text
    assert session1["losses"] | losses == session1["reference"]
    (run,) = (tmp_path / "outputs" / "runs").iterdir()  # a new run folder, recorded as this run's
    assert (tmp_path / "models" / RUN_RECORD).read_text().strip() == run.name


@pytest.fixture()
def main():
    """``python -m pipeline``'s main() in this process. The bundle's logging.conf points the root logger at this
    test's captured stdout; its handlers are restored afterwards, or later tests would log to a closed stream."""
    from pipeline.cli.main import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = []  # an earlier test's handler may write to its captured stream, closed by now
    yield main
    root.handlers[:] = handlers
    root.setLevel(level)


def test_bad_resume_from_is_one_line_and_exit_2(tiny_dataset: Path, tmp_path: Path, session1: dict, capsys,
                                                main) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt.pt"
    data = (session1["input"] / "models" / FINAL_NAME).read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    base = ["--dataset_dir", str(tiny_dataset), "--output_dir", str(tmp_path / "out"), "--ckpt_dir",
            str(tmp_path / "models"), "--cache_dir", str(tmp_path / "store"), *cli_args({**TINY_TRAIN, **QUIET})]
    for source, problem in ((tmp_path / "missing", "resume_from: no such folder or file"),
                            (empty, "resume_from: no readable checkpoint in this folder"),
                            (corrupt, "resume_from: not a readable training checkpoint"),
                            (session1["input"] / "models" / "model.pt", "a model.pt goes to init_from")):
        assert main([*base, "--resume_from", str(source)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {source}: ") and problem in err[-1], err
        assert "Traceback" not in "\n".join(err)
    # a run of another network: refused from its plans before anything is copied or built
    source = session1["input"] / "models"
    assert main([*base, "--resume_from", str(source), "--network_channels", "[8,16,32]"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: {source / FINAL_NAME}: resume_from holds a run of another network "
                           "(network_channels [4, 8, 16] there, [8, 16, 32] now); use the same network settings"), line
    assert not (tmp_path / "models").exists() and not (tmp_path / "store").exists()

    bundle = tmp_path / "bundle_run"  # python -m monai.bundle: the same line, before the volume store is built
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.yaml"),
         "--dataset_dir", str(tiny_dataset), "--output_dir", str(bundle / "out"), "--ckpt_dir", str(bundle / "models"),
         "--cache_dir", str(bundle / "store"), "--resume_from", str(empty)],
        check=False, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {empty}: resume_from: no readable checkpoint in this folder"), line
    assert not (bundle / "store").exists() and not (bundle / "models").exists()


def test_init_from_starts_a_new_run_from_the_weights_with_another_patch(
    tiny_dataset: Path, tmp_path: Path, session1: dict, caplog: pytest.LogCaptureFixture
) -> None:
    model = session1["input"] / "models" / "model.pt"
    saved = torch.load(model, weights_only=True)
    at_start: dict = {}
    fine = {"init_from": str(model), "patch_size": [16, 16, 16], "epochs": 1, "ema": True}
    with caplog.at_level(logging.INFO):
        _train(_parser(tiny_dataset, tmp_path, **fine), at_start)
    assert f"Initialised the weights from {model}" in caplog.text
    assert at_start["epoch"] == 0 and at_start["iteration"] == 0 and not at_start["optimizer"]["state"]
    assert all(torch.equal(at_start["weights"][k], v) for k, v in saved.items())
    plans = torch.load(tmp_path / "models" / "model.pt", weights_only=True)._metadata[""]["plans"]
    assert plans["patch_size"] == [16, 16, 16]  # this run's patch; the weights came from a 32^3 run

    # the same command again: the run resumes and keeps its own weights
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _train(_parser(tiny_dataset, tmp_path, **fine))
    assert f"init_from {model} not used: the resumed run keeps its own weights" in caplog.text
    assert "Initialised the weights" not in caplog.text


def test_init_from_a_file_that_does_not_fit_is_one_line(tiny_dataset: Path, tmp_path: Path, capsys, main) -> None:
    other = build_network(channels=[2, 4, 8], strides=[2, 2], num_res_units=1)
    with_plans, weights_only = tmp_path / "other.pt", tmp_path / "weights_only.pt"
    torch.save(pack_model(other.state_dict(), make_plans(other, [32, 32, 32])), with_plans)
    torch.save(other.state_dict(), weights_only)
    base = ["--dataset_dir", str(tiny_dataset), "--output_dir", str(tmp_path / "out"), "--ckpt_dir",
            str(tmp_path / "models"), "--cache_dir", str(tmp_path / "store"), *cli_args({**TINY_TRAIN, **QUIET})]
    for path, problem in (
        (tmp_path / "missing.pt", "not found; give --init_from a model.pt or a training checkpoint"),
        (with_plans, "init_from holds the weights of another network (network_channels [2, 4, 8] there, "),
        (weights_only, "init_from's weights do not fit this run's network (size mismatch for"),
    ):
        assert main([*base, "--init_from", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {path}: {problem}"), err
        assert "Traceback" not in "\n".join(err)
        if path != weights_only:  # refused from the plans, before the volume store is built
            assert not (tmp_path / "store").exists()
    assert find_latest_checkpoint(tmp_path / "models") is None

