"""``python -m pipeline``: the whole job, its skip-when-done and resume behaviour, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.main import parse_overrides, route_overrides
from pipeline.data.datalist import prepare_datalists
from pipeline.model.plans import POSTPROCESSING_KEYS, load_model_file
from pipeline.training.checkpoint import completed_epochs
from tests.conftest import TINY_TRAIN

REPO = Path(__file__).resolve().parents[2]


def _main(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_overrides_parse_and_route():
    ov = parse_overrides(["--epochs", "4", "--patch_size", "[48,48,48]", "--tta=true", "--lr_schedule", "poly"])
    assert ov == {"epochs": 4, "patch_size": [48, 48, 48], "tta": True, "lr_schedule": "poly"}
    infer = route_overrides(ov, REPO / "bundle" / "configs" / "inference.yaml")
    assert infer == {"patch_size": [48, 48, 48], "tta": True}  # train-only keys stay out of inference


def test_unknown_setting_is_refused(capsys):
    from pipeline.cli.main import main

    assert main(["--epoch", "4"]) == 2  # a typo must not silently train the default schedule
    assert "unknown setting(s) 'epoch' (did you mean 'epochs'?)" in capsys.readouterr().err


def test_main_job_trains_predicts_skips_and_resumes(tiny_dataset, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "models"
    tiny = []
    for k, v in {**TINY_TRAIN, "val_interval": 5}.items():  # fewer epochs than val_interval: validated at the end
        tiny += [f"--{k}", str(v).replace(" ", "")]
    base = ["--dataset_dir", str(tiny_dataset), "--output_dir", str(out), "--ckpt_dir", str(ckpt), *tiny]

    first = _main(base)
    assert "submission:" in first.stdout and (out / "submission.zip").is_file()
    assert (ckpt / "model.pt").is_file()
    # the post-processing is chosen on the validation cases after training (the sweep's best, written into
    # model.pt), and the prediction uses it
    report = json.loads((out / "tuning.json").read_text())
    plans = load_model_file(ckpt / "model.pt")[1]
    assert plans["postprocessing"] == {k: report["best"][k] for k in POSTPROCESSING_KEYS}
    assert plans["tuning"]["volumes"] == report["volumes"] == sorted(
        c["id"] for c in prepare_datalists(tiny_dataset, check=False)["val"])
    assert f"-> {report['best']['score']:.4f}" in first.stdout.split("  post-processing: ")[1]
    assert completed_epochs(ckpt) == TINY_TRAIN["epochs"]
    for stage in ("[pipeline] checked 5 training cases (image + label) and 2 test volumes:", "[pipeline] training:",
                  "[pipeline] predicting 2 test volumes:"):
        assert stage in first.stdout
    (run,) = (out / "runs").iterdir()  # this run's folder: curves, history, TensorBoard events, val overlays
    assert (out / "latest_run").resolve() == run.resolve()
    for name in ("training_curves.png", "training_history.json", "training_history.csv"):
        assert (run / name).is_file()
    for path in (run / "training_curves.png", run / "training_history.csv", run / "overlays"):  # named in the summary
        assert str(path.resolve()) in first.stdout
    assert list(run.glob("events.out.tfevents.*"))
    val_ids = {case["id"] for case in prepare_datalists(tiny_dataset, check=False)["val"]}
    assert {p.name for p in (run / "overlays").iterdir()} == {f"{i}_overlay.png" for i in val_ids}  # last validation
    assert f"{out / 'overlays'}/<id>_overlay.png" in first.stdout and len(list((out / "overlays").glob("*.png"))) == 2

    (out / "submission.zip").unlink()
    again = _main(base)
    assert "training already complete" in again.stdout  # straight to inference
    assert "choosing the post-processing" not in again.stdout  # tuned after the training that made the model
    assert (out / "submission.zip").is_file()

    more = _main([*base, "--epochs", "3"])  # raising epochs on a finished run continues it
    log = more.stdout + more.stderr
    assert "Resumed from" in log and "at epoch 2" in log
    assert completed_epochs(ckpt) == 3
    assert list((out / "runs").iterdir()) == [run]  # ... in its own folder
    assert [row["epoch"] for row in json.loads((run / "training_history.json").read_text())["epochs"]] == [1, 2, 3]
    # a new run (another ckpt_dir, or auto_resume off) gets a folder of its own: tests/training/test_runs.py


def test_folds_train_each_fold_score_every_case_once_out_of_fold_tune_and_predict_with_their_ensemble(tiny_dataset, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "models"
    tiny = []
    for k, v in {**TINY_TRAIN, "epochs": 1, "val_interval": 5}.items():
        tiny += [f"--{k}", str(v).replace(" ", "")]
    base = ["--dataset_dir", str(tiny_dataset), "--output_dir", str(out), "--ckpt_dir", str(ckpt), *tiny,
            "--folds", "all", "--num_folds", "2"]
    first = _main(base)
    cv = json.loads((out / "cross_validation.json").read_text())
    for k in (0, 1):  # each case scored by the fold that held it out, and only by it
        held_out = {c["id"] for c in prepare_datalists(tiny_dataset, fold=k, num_folds=2, check=False)["val"]}
        assert {i for i, row in cv["volumes"].items() if row["fold"] == k} == held_out
        assert (ckpt / f"fold_{k}" / "model.pt").is_file() and completed_epochs(ckpt / f"fold_{k}") == 1
        assert {p.stem for p in (out / f"fold_{k}" / "oof").glob("*.tif")} == held_out
    lists = prepare_datalists(tiny_dataset, check=False)
    assert set(cv["volumes"]) == {c["id"] for c in lists["train"] + lists["val"]} and cv["complete"]
    assert f"cross-validation: score {cv['mean']['score']:.4f}" in first.stdout
    # the post-processing is chosen on the out-of-fold cases and written with the folds' ensemble, which predicts
    report = json.loads((out / "tuning.json").read_text())
    assert report["folds"] == [0, 1] and len(report["volumes"]) == len(cv["volumes"])
    spec = json.loads((ckpt / "ensemble.json").read_text())
    assert spec["models"] == ["fold_0/model.pt", "fold_1/model.pt"]
    assert spec["postprocessing"] == {k: report["best"][k] for k in POSTPROCESSING_KEYS}
    assert f"out-of-fold volume(s), score {report['default']['score']:.4f}" in first.stdout
    assert (out / "submission.zip").is_file() and f"model:          {ckpt / 'ensemble.json'}" in first.stdout

    again = _main(base)  # done folds are neither trained nor scored again
    assert again.stdout.count("training already complete") == 2 and again.stdout.count("scored already") == 2


def test_bad_folds_are_one_line(capsys):
    from pipeline.cli.main import main

    for args, problem in ((["--folds", "2", "--num_folds", "2"], "give 'all' or fold numbers from 0 to 1"),
                          (["--folds", "x"], "give 'all' or fold numbers from 0 to 4"),
                          (["--folds", "all", "--time_limit", "1h"], "not with --time_limit")):
        assert main(args) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"error: --folds {args[1]}: {problem}"), line


def test_a_bad_tune_time_is_refused_before_anything_runs(capsys, tmp_path):
    from pipeline.cli.main import main

    assert main(["--tune_time", "soon", "--synthetic_dir", str(tmp_path / "synth")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --tune_time: 'soon' is not a time limit")
    assert not (tmp_path / "synth").exists()


_TRAIN_SEES = """
import sys
from pathlib import Path
from pipeline.cli import main as m

def train(overrides, args):  # what the job's own process holds while its DDP workers train
    heavy = sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "monai", "ignite"))
    print("HEAVY", heavy, "NPROC", args.nproc, "CUDA", args.cuda, "WORK", "inference_voxels" in overrides, flush=True)
    store = Path(overrides["output_dir"]) / "store"
    print("STORE", len(list(store.glob("*.json"))) if store.is_dir() else 0, flush=True)
    return 3

m._train = train
sys.exit(m.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("mode", [["--time_limit", "2h"], ["--folds", "all", "--num_folds", "2"]])
def test_the_job_holds_no_torch_while_it_trains(tiny_dataset, tmp_path, mode):
    """The dataset check, the clock's inference work, the devices and (folds) each fold's completeness are found in
    a child process, and the volume store is built in one before the training starts: the job's own process, which
    waits while DDP workers train, imports neither torch nor MONAI (they hold ~0.3 GiB for the life of a process,
    the check ~0.2 GiB more; the Kaggle box needs it as page cache), and the training processes find the store
    built. A training that fails stops the job with its exit code."""
    args = ["--dataset_dir", str(tiny_dataset), "--output_dir", str(tmp_path / "out"), "--ckpt_dir",
            str(tmp_path / "models"), "--nproc", "2", *mode]
    for k, v in TINY_TRAIN.items():
        args += [f"--{k}", str(v).replace(" ", "")]
    proc = subprocess.run([sys.executable, "-c", _TRAIN_SEES, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[pipeline] checked 5 training cases (image + label) and 2 test volumes" in proc.stdout
    timed = mode[0] == "--time_limit"
    assert f"HEAVY [] NPROC 2 CUDA False WORK {timed}" in proc.stdout, proc.stdout[-3000:]
    out = tmp_path / "out" / ("fold_0" if not timed else "")
    built = len(list((out / "store").glob("*.json")))
    assert built >= 5 and f"STORE {built}" in proc.stdout  # every case of the dataset, before the training


def test_a_bad_dataset_found_in_the_child_is_one_line(tmp_path):
    """The dataset check's refusal crosses the process boundary as the same one line and exit code."""
    (tmp_path / "data" / "train_images").mkdir(parents=True)
    (tmp_path / "data" / "train.csv").write_text("id,scroll_id\n7,1\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--dataset_dir", str(tmp_path / "data"), "--output_dir",
                           str(tmp_path / "out"), "--ckpt_dir", str(tmp_path / "models")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "7" in last and "Traceback" not in proc.stderr, proc.stderr
