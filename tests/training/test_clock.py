"""time_limit: durations, the clock's estimates, the cut (validated, checkpointed, resumed exactly) and the main job
cut by the clock with its submission written in time."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from pipeline.data import datalist
from pipeline.inference.submission import check_submission
from pipeline.training.checkpoint import checkpoint_name, find_latest_checkpoint
from pipeline.training.clock import TimeLimit
from pipeline.training.lock import LOCK_NAME
from pipeline.utils.errors import SettingsError
from pipeline.utils.timing import parse_duration
from tests._ckpt_worker import build
from tests._faults import ClockCutAt
from tests.conftest import TINY_TRAIN
from transforms.io import read_volume_shape

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(3600, 3600.0), ("11h30m", 41400.0), ("90m", 5400.0), ("1.5h", 5400.0), ("2d", 172800.0), ("1h2m3s", 3723.0),
     ("45", 45.0), (None, None), ("null", None)],
)
def test_parse_duration(text, seconds) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "5x", "-1", 0, True, "h"])
def test_parse_duration_refuses_in_one_line(text) -> None:
    with pytest.raises(SettingsError, match="is not a time limit; give seconds"):
        parse_duration(text)


def test_estimates_before_and_after_a_validation_and_the_decision() -> None:
    clock = TimeLimit("1h", start=time.time(), val_cases=[{"shape": [64, 64, 64]}] * 2, val_overlap=0.5,
                      patch_size=[32, 32, 32], patches_per_iteration=2, inference_voxels=8 * 64**3,
                      inference_overlap=0.5)
    assert clock.validation_estimate() == 0.0 and not clock.due(None)  # nothing measured: never stops blind
    clock._steps.extend([0.6] * 5)
    forward = 32**3 / (0.6 / (3 * 2)) / 8  # voxels/s: a forward ~ a third of a step, 8 windows per voxel at 0.5
    assert clock.validation_estimate() == pytest.approx(2 * 64**3 / forward)
    clock.validation_s, clock.validated_voxels = 2.0, 2 * 64**3  # measured: 64^3 voxels/s
    clock.forward_s = 2.0  # its sliding windows (no scoring here)
    assert clock.validation_estimate() == 2.0 and clock.inference_estimate() == pytest.approx(8.0)
    cost = 1.25 * (2.0 + clock.save_s + 8.0) + 10.0 + 0.03 * 3600
    assert clock.stop_cost() == pytest.approx(cost)
    assert not clock.due(None)
    clock.deadline = time.time() + 1.5 * 0.6 + cost - 1.0
    assert clock.due(None)


def test_the_clock_measures_a_monai_validation_in_voxels_per_second() -> None:
    """The inference estimate after a validation is the validation's measured speed: a MONAI evaluator decollates
    its batch into per-case dicts, whose voxels the clock must still count (it counted none, and the 40 x 320^3 dry
    run's prediction then took 345 s against an estimate of 67 s made from the training step)."""
    from monai.engines import SupervisedEvaluator

    shapes = [(1, 20, 16, 12), (1, 12, 16, 20)]
    data = [{"image": torch.zeros(1, *s), "label": torch.zeros(1, *s)} for s in shapes]
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data,
                                    network=torch.nn.Conv3d(1, 1, 1), epoch_length=len(data))
    clock = TimeLimit("1h", start=time.time(), inference_voxels=10**6, inference_overlap=0.25)
    clock.attach(Engine(lambda e, b: None), evaluator)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: time.sleep(0.3))  # the scoring, after the windows
    evaluator.run()
    assert clock.validated_voxels == 2 * 20 * 16 * 12 and clock.validation_s >= 0.6
    assert 0 < clock.forward_s < 0.3 and clock.validation_estimate() == clock.validation_s
    speed = clock.validated_voxels / clock.forward_s  # the sliding windows alone: inference does not score
    assert clock.inference_estimate() == pytest.approx(10**6 / speed)  # the same overlaps (0.25 and 0.25 here)


def test_before_a_validation_its_estimate_holds_the_windows_and_the_scoring() -> None:
    """The first 40 x 320^3 dry runs estimated a validation of 8 cases from the training step alone (3:08) and it took
    9:55, most of it the exact TopoScore: the estimate now adds the scoring at SCORE_S_PER_VOXEL."""
    from pipeline.training.clock import SCORE_S_PER_VOXEL

    cases = [{"shape": (1, 320, 320, 320)}] * 8
    plain = TimeLimit("1h", start=time.time(), val_cases=cases, patch_size=(128,) * 3, val_overlap=0.25)
    scored = TimeLimit("1h", start=time.time(), val_cases=cases, patch_size=(128,) * 3, val_overlap=0.25,
                       score_s_per_voxel=SCORE_S_PER_VOXEL["exact"])
    for clock in (plain, scored):
        clock._steps.extend([2.0] * 5)
    assert scored.validation_estimate() == pytest.approx(plain.validation_estimate() + 8 * 320**3 * 2.2e-6)
    assert 8 * 320**3 * 2.2e-6 == pytest.approx(577, abs=1)  # ~70 s a case


def test_a_limit_too_short_for_one_epoch_is_refused_with_the_minimum() -> None:
    from types import SimpleNamespace

    engine = SimpleNamespace(state=SimpleNamespace(epoch_length=1000, iteration=0))
    clock = TimeLimit("1h", start=time.time())
    clock.resumed(engine)  # a fresh run
    clock._steps.extend([0.5] * 4)
    assert clock.refusal(engine) is None  # judged after five iterations
    clock._steps.append(5.0)  # the median stays 0.5 s: 1000 iterations fit in an hour
    assert clock.refusal(engine) is None and clock.refusal(engine) is None  # judged once
    slow = TimeLimit("1h", start=time.time())
    slow.resumed(engine)
    slow._steps.extend([4.0] * 5)  # 4000 s for one epoch
    why = slow.refusal(engine)
    assert why.startswith("time_limit 1:00:00 is too short for one epoch") and "give at least 1:" in why
    # the estimates fit, the safety factor and margin do not: tried (the clock then stops it as early as it must)
    borderline = TimeLimit("1h", start=time.time())
    borderline.resumed(engine)
    borderline._steps.extend([3.5] * 5)  # 3500 s for one epoch + 5 s fit; + 1.25 x 5 s + 10 s + 108 s do not
    assert borderline.refusal(engine) is None
    engine.state.iteration = 50
    resumed = TimeLimit("1h", start=time.time())
    resumed.resumed(engine)  # a resumed run goes on as far as the limit lets it
    resumed._steps.extend([4.0] * 5)
    assert resumed.refusal(engine) is None


def _eats_random_numbers(setup) -> None:
    """The validation draws from the global RNG (as a loader with workers does for its base seed)."""
    setup.evaluator.add_event_handler(Events.STARTED, lambda _: torch.rand(1))


@pytest.mark.parametrize("at", [5, 6])  # mid-epoch 2 (3 iterations per epoch), and its end
def test_cut_by_the_clock_validates_saves_and_resumes_exactly(tmp_path: Path, at: int, caplog) -> None:
    reference = build(tmp_path / "reference", seed=0, max_epochs=4, every_epochs=None)
    _eats_random_numbers(reference)
    reference.trainer.run()

    ckpt = tmp_path / "ckpt"
    cut = build(ckpt, seed=0, max_epochs=4, every_epochs=None, clock=ClockCutAt(at))
    _eats_random_numbers(cut)
    with caplog.at_level(logging.WARNING):
        cut.trainer.run()  # ends normally: exit code 0
    assert cut.checkpointer.stopped_by_clock and "stopped by the clock at epoch 2" in caplog.text
    assert sorted(cut.losses) == list(range(1, at + 1))
    assert sorted(p.name for p in ckpt.iterdir() if p.name != LOCK_NAME) == [checkpoint_name(2, at)]  # no final
    assert cut.evaluator.state.epoch == 2  # the newest weights validated (at the cut, or by the epoch's validation)

    resumed = build(ckpt, seed=123, max_epochs=4, every_epochs=None)
    _eats_random_numbers(resumed)
    resumed.trainer.run()
    assert sorted(resumed.losses) == list(range(at + 1, 13))
    assert cut.losses | resumed.losses == reference.losses
    assert cut.lrs | resumed.lrs == reference.lrs
    for p, q in zip(resumed.network.parameters(), reference.network.parameters(), strict=True):
        assert torch.equal(p, q)


def _main(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=400, env={**os.environ, "OMP_NUM_THREADS": "2", **env})


def test_main_job_cut_by_the_clock_writes_its_submission_in_time(tiny_dataset: Path, tmp_path: Path) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "models"
    tiny = []
    for k, v in {**TINY_TRAIN, "epochs": 1000, "val_interval": 3}.items():  # far more than the limit holds
        tiny += [f"--{k}", str(v).replace(" ", "")]
    base = ["--dataset_dir", str(tiny_dataset), "--output_dir", str(out), "--ckpt_dir", str(ckpt), *tiny]

    too_short = _main([*base, "--time_limit", "3s"])
    assert too_short.returncode == 2, too_short.stderr[-2000:]
    assert too_short.stderr.strip().splitlines()[-1].startswith("error: time_limit 0:00:03")
    assert find_latest_checkpoint(ckpt) is None and not (out / "submission.zip").exists()
    bad = _main([*base, "--time_limit", "11x"])
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: time_limit: '11x' is not a time limit; give seconds (e.g. 41400) or a duration such as 11h30m, 90m "
        "or 1.5h (null for none)")

    limit = 80  # the data check, the store build and two process starts take ~40 s here, more on a busy CI box
    start = time.time()
    job = _main([*base, "--time_limit", str(limit)])
    took = time.time() - start
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "[pipeline] training (cut by the clock: stopped at checkpoint_epoch=" in job.stdout
    assert "training:       cut by the clock" in job.stdout
    assert "post-processing: not tuned: training was cut by the clock" in job.stdout  # no time to choose it
    assert took < limit, f"the job took {took:.1f} s of its {limit} s"
    latest = find_latest_checkpoint(ckpt)
    assert latest is not None and (ckpt / "model.pt").is_file()
    shapes = {case["id"]: read_volume_shape(case["image"]) for case in datalist.test_datalist(tiny_dataset)}
    check_submission(out / "submission.zip", shapes)


def test_a_run_cut_short_is_not_validated_again_at_its_end() -> None:
    from ignite.engine import Engine

    from pipeline.training.engine import validate_at_end

    class _Evaluator:
        runs: list[int] = []

        def run(self, epoch: int) -> None:
            self.runs.append(epoch)

    for cut in (False, True):
        trainer, evaluator = Engine(lambda e, b: None), _Evaluator()
        evaluator.runs = []
        validate_at_end(trainer, evaluator, interval=5)
        if cut:
            trainer.add_event_handler(Events.ITERATION_COMPLETED(once=4), lambda e: e.terminate())
        trainer.run([0, 1], max_epochs=3)
        assert evaluator.runs == ([] if cut else [3])


def test_cycle_ends_and_epoch_settings() -> None:
    from pipeline.training.clock import EpochsToFit, cycle_ends, schedule_epochs

    assert cycle_ends(1, 10, 2, 71) == [11, 31, 71] and cycle_ends(1, 10, 2, 70) == [11, 31]
    assert cycle_ends(0, 5, 1, 16) == [5, 10, 15]
    assert schedule_epochs(71) == 71 and schedule_epochs("auto") > 10**5
    for bad in (0, -3, 2.5, "many"):
        with pytest.raises(SettingsError, match="is not a number of epochs"):
            schedule_epochs(bad)
    with pytest.raises(SettingsError, match="epochs: auto fixes the number of epochs to fit a time_limit"):
        EpochsToFit(TimeLimit(None), "auto")


def test_epochs_auto_chooses_a_cycle_end_stores_it_and_keeps_it_on_resume(tiny_dataset: Path, tmp_path: Path) -> None:
    from pipeline.training.checkpoint import FINAL_NAME
    from pipeline.training.clock import cycle_ends

    out, ckpt = tmp_path / "out", tmp_path / "models"
    tiny = []
    for k, v in {**TINY_TRAIN, "epochs": "auto", "val_interval": 2, "warmup_epochs": 1, "T_0": 2}.items():
        tiny += [f"--{k}", str(v).replace(" ", "")]
    base = ["--dataset_dir", str(tiny_dataset), "--output_dir", str(out), "--ckpt_dir", str(ckpt), *tiny]
    job = _main([*base, "--time_limit", "100"])  # the data check, the store build and two starts take ~40 s here
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-3000:]
    assert "epochs: auto:" in log and ("revised with the first validation measured" in log or "epochs, fixed" in log)
    assert "Epoch 1/auto done in" in log  # the progress line until the choice
    saved = torch.load(find_latest_checkpoint(ckpt), weights_only=True)["trainer"]  # final, or the cut's (busy CPU)
    chosen = saved["epochs_chosen"]
    assert saved["max_epochs"] == chosen and chosen in cycle_ends(1, 2, 2, chosen)

    (ckpt / FINAL_NAME).unlink(missing_ok=True)  # as if the run had been cut before its last epoch ended
    again = _main([*base, "--time_limit", "1h"])
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert f"epochs: auto: keeping the {chosen} epochs chosen when the run started" in log
    final = torch.load(ckpt / FINAL_NAME, weights_only=True)["trainer"]
    assert final["epochs_chosen"] == final["epoch"] == chosen


def test_the_job_start_is_set_for_the_job_only(monkeypatch, capsys) -> None:
    from pipeline.cli.main import main
    from pipeline.utils.timing import JOB_START_ENV

    monkeypatch.delenv(JOB_START_ENV, raising=False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # an earlier in-process run's handler may hold a closed stream
    assert main(["--time_limit", "11x"]) == 2  # in this process, as a notebook would call it
    assert "is not a time limit" in capsys.readouterr().err
    assert JOB_START_ENV not in os.environ  # a later job (or a bundle run) counts from its own start


def test_no_stop_on_fewer_than_five_measured_iterations_unless_the_time_is_up() -> None:
    clock = TimeLimit("1h", start=time.time())
    clock._steps.extend([2400.0] * 4)  # e.g. the slow first steps of a run on a busy machine: not enough to judge by
    assert not clock.due(None)
    clock._steps.append(2400.0)
    assert clock.due(None)  # five: 1.5 x 2400 s and the stop's cost no longer fit in the hour left
    clock._steps.clear()
    clock._steps.append(600.0)
    clock.deadline = time.time() - 1.0
    assert clock.due(None)
