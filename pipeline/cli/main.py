"""``python -m pipeline``: the whole job (train or resume, then predict), and the project's other commands.

    python -m pipeline [--dataset_dir DIR] [--output_dir DIR] [--nproc N] [--<bundle key> VALUE ...]
    python -m pipeline --folds all|0,2 [--num_folds K] [...]   # cross-validation, then the folds' ensemble
    python -m pipeline synth --out DIR [--seed S] [--difficulty easy|hard]
    python -m pipeline score --pred submission.zip --labels DIR [--json] [--topo_mode exact|fast]   # exact by default
    python -m pipeline tune [--dataset_dir DIR] [--<bundle key> VALUE ...]
    python -m pipeline predict --input PATH --output OUT.zarr [--model_path M] [--num_parts N --part_id I]
    python -m pipeline merge --pred_dir DIR [DIR ...] [--dataset_dir DIR] [--output submission.zip]
    python -m pipeline configs              # the bundle's configs folder (installed copy or the checkout's)
    python -m pipeline wheelhouse DIR       # the project's wheel + the wheels this environment lacks (offline install)

With no dataset the main job generates the synthetic scrolls into ``data/synthetic`` and trains on them with
train.yaml's settings (about 5 minutes on a 2-core CPU). Any other ``--key value`` overrides the bundle key of that name in the configs that have it,
except that the network keys and ``patch_size`` go to training only: inference reads them from the model file.
It announces each stage with its time and ends with a list of everything it wrote.

Parsing (``--help``, argument errors, unknown keys) happens before torch and MONAI are imported: it answers at once.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.cli import parsers as cli
from pipeline.utils.errors import run_reporting_errors, suggest
from pipeline.utils.paths import BUNDLE, model_file

__all__ = ["fold_list", "main", "parse_overrides", "route_overrides"]

CONFIGS = BUNDLE / "configs"
TRAIN_CONFIG = CONFIGS / "train.yaml"
INFER_CONFIG = CONFIGS / "inference.yaml"
MULTI_GPU_CONFIG = CONFIGS / "multi_gpu_train.yaml"
LOGGING_CONF = CONFIGS / "logging.conf"

COMMANDS = ("run", "synth", "score", "tune", "predict", "merge", "configs", "wheelhouse")
# what inference reads from the model file's plans (pipeline/model/plans.py): given to training only, never twice
FROM_MODEL_FILE = ("architecture", "deep_supervision", "network_channels", "network_strides", "num_res_units",
                   "patch_size")

logger = logging.getLogger("pipeline")


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return yaml.safe_load(text)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--epochs", "4", "--patch_size", "[48,48,48]"]`` -> ``{"epochs": 4, "patch_size": [48, 48, 48]}``.

    Raises:
        SystemExit: an argument that is not a ``--key value`` pair.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            sys.exit(f"error: unexpected argument {arg!r}; bundle overrides are --key value pairs")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                sys.exit(f"error: --{key} needs a value")
            val, i = args[i + 1], i + 1
        out[key] = _value(val)
        i += 1
    return out


def _top_keys(config: Path) -> set[str]:
    return cli.config_keys(config)


class _Stage:
    """Prints ``[pipeline] <what> ...`` on entry and ``[pipeline] <what>: <seconds> s`` on a clean exit."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> _Stage:
        print(f"[pipeline] {self.what} ...", flush=True)
        self.start = time.monotonic()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            print(f"[pipeline] {self.what}: {time.monotonic() - self.start:.1f} s", flush=True)


def route_overrides(overrides: dict[str, Any], *configs: Path) -> dict[str, Any]:
    """The overrides whose (top-level part of the) key exists in one of ``configs``."""
    keys = set().union(*(_top_keys(c) for c in configs))
    return {k: v for k, v in overrides.items() if k.split("#", 1)[0] in keys}


def _bundle_run(run_id: str, config: Path | list[Path], overrides: dict[str, Any]) -> None:
    from monai.bundle import run

    files = [str(c) for c in config] if isinstance(config, list) else str(config)
    run(run_id, config_file=files, logging_file=str(LOGGING_CONF), meta_file=str(CONFIGS / "metadata.json"), **overrides)


def _check_dataset(dataset_dir: str | None, synthetic_dir: str) -> tuple[Path, list[dict]]:
    """The dataset folder (the synthetic one generated first when needed), checked; and its test volumes."""
    from pipeline.data.datalist import (
        check_test_datalist,
        prepare_datalists,
        resolve_dataset_dir,
        test_datalist,
    )

    generate = dataset_dir is None and not (Path(synthetic_dir) / "train.csv").is_file()
    with _Stage(f"generating synthetic data into {synthetic_dir}") if generate else contextlib.nullcontext():
        root = resolve_dataset_dir(dataset_dir, synthetic_dir)
    with _Stage(f"checking the dataset in {root}") as stage:
        lists = prepare_datalists(root, check=True)
        tests = test_datalist(root)
        check_test_datalist(tests)
        n_train = len(lists["train"]) + len(lists["val"])
        stage.what = f"checked {n_train} training cases (image + label) and {len(tests)} test volumes"
    return root, tests


def _inference_work(tests: list[dict], overrides: dict[str, Any]) -> dict[str, Any]:
    """What training's clock reserves for the prediction after it (``time_limit``): the test voxels times the
    inference's TTA passes, and its overlap, as inference.yaml resolves them with ``overrides``."""
    import math

    from pipeline.utils.config import load_config
    from transforms.io import read_volume_shape

    parser = load_config(INFER_CONFIG, overrides=route_overrides(overrides, INFER_CONFIG))
    tta, axes, overlap = (parser.get_parsed_content(k) for k in ("tta", "tta_axes", "overlap"))
    voxels = sum(math.prod(read_volume_shape(case["image"])) for case in tests)
    return {"inference_voxels": voxels * (2 ** len(axes) if tta else 1), "inference_overlap": float(overlap)}


def _survey(args: argparse.Namespace, overrides: dict[str, Any], timed: bool, single: bool) -> dict[str, Any]:
    """What the job finds out before it trains, run by :func:`pipeline.utils.memory.run_apart` so that the imports
    and the dataset check leave nothing behind in the job's own process: the checked dataset folder and its test
    volumes, the clock's inference work (``timed``: with ``time_limit``), the processes per node, whether they use
    CUDA, and (``single``: not ``--folds``) whether the training in ``ckpt_dir`` is complete already."""
    from pipeline.cli import launch

    root, tests = _check_dataset(args.dataset_dir, args.synthetic_dir)
    return {
        "root": root,
        "tests": tests,
        "inference_work": _inference_work(tests, overrides) if timed else {},
        "nproc": args.nproc or launch.default_nproc(),
        "cuda": launch.cuda_available(),
        "complete": single and not args.skip_training and _training_complete({"ckpt_dir": args.ckpt_dir, **overrides}),
    }


def _prepare_training(overrides: dict[str, Any]) -> None:
    """train.yaml's ``checks``, then its volume store built, as the training would (run by
    :func:`pipeline.utils.memory.run_apart` before it starts): the store build's decoding threads leave ~0.45 GiB of
    heap behind in the process that ran them, which under DDP was every rank's for the whole training (a 2-process
    40 x 320^3 dry run was killed by its memory cap while validating). The training then finds every entry built.

    Raises:
        PipelineError: the checks' or the store's one-line error (not MONAI's wrapper, which would not cross the
            process boundary with its cause).
    """
    import logging.config

    from pipeline.utils.config import load_config
    from pipeline.utils.errors import find_user_error

    logging.config.fileConfig(LOGGING_CONF, disable_existing_loggers=False)  # the store's progress, as in training
    parser = load_config(TRAIN_CONFIG, overrides=route_overrides(overrides, TRAIN_CONFIG))
    try:
        parser.get_parsed_content("checks")
        parser.get_parsed_content("store")
    except Exception as e:
        user = find_user_error(e)
        if user is None or user is e:
            raise
        raise user from None


def run_main_job(argv: list[str]) -> int:
    """Train (or resume) and predict; print where everything is. ``time_limit`` counts from here: the start goes to
    the processes the job runs in ``$PIPELINE_JOB_START``, set for the job only (a second job in this process, or a
    bundle run after it, counts from its own start)."""
    from pipeline.utils.timing import JOB_START_ENV

    previous = os.environ.get(JOB_START_ENV)
    os.environ[JOB_START_ENV] = repr(time.time())
    try:
        return _main_job(argv)
    finally:
        if previous is None:
            os.environ.pop(JOB_START_ENV, None)
        else:
            os.environ[JOB_START_ENV] = previous


def _main_job(argv: list[str]) -> int:
    args, rest = cli.main_parser().parse_known_args(argv)
    overrides = parse_overrides(rest)
    known = set().union(*(_top_keys(c) for c in (TRAIN_CONFIG, MULTI_GPU_CONFIG, INFER_CONFIG)))
    where = "train.yaml, multi_gpu_train.yaml or inference.yaml"
    if args.recipe is not None:
        try:
            overrides = cli.with_recipe(args.recipe, overrides, known, where)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    unknown = cli.unknown_keys_message(overrides, known, where)
    if unknown:
        print(f"error: {unknown}", file=sys.stderr)
        return 2
    if args.dataset_dir is not None and not Path(args.dataset_dir).is_dir():  # before the heavy imports below
        print(f"error: {args.dataset_dir}: dataset folder not found (leave --dataset_dir out for the synthetic "
              "default)", file=sys.stderr)
        return 2
    folds = fold_list(args.folds, overrides) if args.folds is not None else None
    from pipeline.utils.errors import PipelineError
    from pipeline.utils.memory import run_apart
    from pipeline.utils.timing import JOB_START_ENV, format_eta, parse_duration

    limit_s = parse_duration(overrides.get("time_limit"))
    parse_duration(args.tune_time, "--tune_time")  # refused now, not after the training
    start = time.monotonic()
    try:  # in a child: this process only waits while the DDP workers train, holding no torch or MONAI
        found = run_apart(_survey, args, overrides, limit_s is not None, folds is None)
    except (PipelineError, FileExistsError) as e:  # a bad dataset, or a synthetic folder that is not one
        print(f"error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    root, tests = found["root"], found["tests"]
    args.nproc, args.cuda = found["nproc"], found["cuda"]  # the devices, as the child found them
    common = {
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(root),
        "output_dir": args.output_dir,
        "ckpt_dir": args.ckpt_dir,
    }
    train_overrides = {**common, "check_data": False, **overrides}  # checked above already: read every label once
    if limit_s is not None:  # the clock keeps time for the prediction of the test set after training
        train_overrides = {**found["inference_work"], **train_overrides}
    cut = tuned = cv = None
    if folds is not None:
        rc, models, cv = _cross_validate(folds, root, train_overrides, args)
        if rc != 0:
            return rc
        ensemble = None
        if args.no_tune:
            tuned = "not tuned (--no_tune): the folds' ensemble predicts with the first fold's model file setting"
        else:
            tuned, ensemble = _tune(train_overrides, overrides, tests, args, limit_s, folds)
        overrides = {**overrides, "model_path": ensemble or [str(m) for m in models]}
    elif not args.skip_training and not found["complete"]:
        with _Stage("checking the training settings and building the volume store"):
            run_apart(_prepare_training, train_overrides)
        with _Stage("training") as stage:
            rc = _train(train_overrides, args)
            if rc != 0:
                stage.what = f"training failed (exit code {rc})"
            else:
                cut = _cut_by_clock(train_overrides)
                if cut:
                    stage.what = f"training (cut by the clock: {cut})"
        if rc != 0:  # DDP: the failing rank printed its error above; nothing downstream runs on a failed training
            logs = Path(args.output_dir) / "logs"
            what = f"stopped by signal {rc - 128}, checkpoint saved" if rc > 128 else "failed"
            print(f"error: training {what} (exit code {rc}; rank logs in {logs}): not predicting", file=sys.stderr)
            return rc
        if args.no_tune:
            tuned = "not tuned (--no_tune): the model file's setting is used"
        elif cut:
            tuned = "not tuned: training was cut by the clock, the time left is the prediction's"
        else:
            tuned = _tune(train_overrides, overrides, tests, args, limit_s)[0]
    given = overrides.get("model_path", model_file(args.ckpt_dir, BUNDLE))
    model = Path(given) if isinstance(given, (str, os.PathLike)) else f"ensemble of {len(given)}: {', '.join(given)}"
    if isinstance(model, Path) and model.is_file():
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(model.stat().st_mtime))
        print(f"predicting with {model} (saved {saved})", flush=True)
    with _Stage(f"predicting {len(tests)} test volumes") as stage:
        infer = {k: v for k, v in overrides.items() if k.split("#", 1)[0] not in FROM_MODEL_FILE}
        rc = _infer(route_overrides({**common, "check_data": False, **infer}, INFER_CONFIG), args)
        if rc != 0:
            stage.what = f"prediction failed (exit code {rc})"
    if rc != 0:
        print(f"error: prediction failed (exit code {rc}; rank logs in {Path(args.output_dir) / 'logs'})",
              file=sys.stderr)
        return rc
    print(_summary(time.monotonic() - start, root, Path(args.output_dir), Path(args.ckpt_dir), model))
    if limit_s is not None:
        used = time.time() - float(os.environ[JOB_START_ENV])
        print(f"  time:           {format_eta(used)} of time_limit {format_eta(limit_s)}")
    if cv is not None:
        mean = cv["mean"]
        per_fold = ", ".join(f"fold {k} {v['score']:.4f}" for k, v in cv["folds"].items())
        print(f"  cross-validation: score {mean['score']:.4f} (topo {mean['topo']:.4f}, surface Dice "
              f"{mean['surface_dice']:.4f}, VOI score {mean['voi_score']:.4f}) over {mean['cases']} out-of-fold "
              f"cases; {per_fold} ({Path(args.output_dir) / 'cross_validation.csv'})")
    if tuned:
        print(f"  post-processing: {tuned}")
    if cut:
        print(f"  training:       cut by the clock ({cut}); the submission is written from the best model so far. "
              "Run the same command again (in the next session: with resume_from the saved ckpt_dir) to continue")
    return 0


def _tune(train_overrides: dict[str, Any], overrides: dict[str, Any], tests: list[dict], args: argparse.Namespace,
          limit_s: float | None, folds: list[int] | None = None) -> tuple[str, str | None]:
    """After training: choose the post-processing on the validation cases training validated on, as nnU-Net's
    ``find_best_configuration`` does: ``python -m pipeline tune``'s sweep of
    :data:`pipeline.evaluation.tune.MAIN_JOB_GRID`, the best setting written into the model file, which the
    prediction then uses. ``folds``: on the folds' out-of-fold cases, the setting written with the folds' ensemble
    into ``ckpt_dir/ensemble.json``. It starts volumes only while they can be scored by ``--tune_time`` from its
    start and, under ``time_limit``, while the prediction still fits after it.

    Returns:
        The summary's line: what was chosen and the validation gain, or why nothing was tuned; and the file written
        (None when nothing was).
    """
    from pipeline.model.plans import POSTPROCESSING_KEYS

    given = [k for k in POSTPROCESSING_KEYS if k in overrides]
    if given:
        return f"not tuned: {', '.join(given)} given on the command line (they win at inference)", None
    if "model_path" in overrides:
        return f"not tuned: --model_path {overrides['model_path']} is not this training's model", None
    if args.nnodes > 1:
        return "not tuned: a multi-node job (run python -m pipeline tune on one machine, then predict)", None
    from pipeline.cli import tune as tune_cli
    from pipeline.data.datalist import prepare_datalists
    from pipeline.evaluation.tune import EVALUATE_CONFIGS, MAIN_JOB_GRID, Deadline, TimeUp, sweep_workers
    from pipeline.utils.timing import JOB_START_ENV, parse_duration
    from transforms.io import read_volume_shape

    # the cases training validated on (evaluate.yaml's default is every case)
    val_max_cases = _train_setting(overrides, "val_max_cases")
    keys = route_overrides(train_overrides, *(CONFIGS / c for c in EVALUATE_CONFIGS))
    keys = {k: v for k, v in keys.items() if k.split("#", 1)[0] not in FROM_MODEL_FILE}
    keys["val_max_cases"] = val_max_cases
    end, follow = math.inf, 0
    if limit_s is not None:
        end = float(os.environ[JOB_START_ENV]) + limit_s
        follow = _inference_work(tests, overrides)["inference_voxels"]
    tune_s = parse_duration(args.tune_time, "--tune_time")
    deadline = Deadline(end=end, follow_voxels=follow, cap=None if tune_s is None else time.time() + tune_s)
    cases = "the folds' out-of-fold cases" if folds else "the validation cases"
    lists = prepare_datalists(train_overrides["dataset_dir"], check=False)
    largest = max(math.prod(read_volume_shape(c["image"])) for c in lists["train"] + lists["val"])
    workers = sweep_workers(largest)  # the training is over: its cores and memory score settings in parallel
    with _Stage(f"choosing the post-processing on {cases} ({workers} scoring process(es))") as stage:
        try:
            report = tune_cli.tune(keys, MAIN_JOB_GRID, deadline=deadline, top=5, folds=folds, workers=workers)
        except TimeUp as e:
            stage.what = "choosing the post-processing: no time left"
            return (f"not tuned: {e}; the model file's setting is used (the whole sweep: python -m pipeline tune "
                    "with this job's --dataset_dir and --ckpt_dir, or a longer --tune_time)"), None
    best, default = report["best"], report["default"]
    chosen = ", ".join(f"{k} {best[k]}" for k in POSTPROCESSING_KEYS if best[k] is not None)
    stopped = f", stopped early: {report['stopped']}" if report["stopped"] else ""
    where = f"; the folds' ensemble: {report['saved']}" if folds else ""
    return (f"{chosen}: chosen on {len(report['volumes'])} {'out-of-fold' if folds else 'validation'} volume(s), "
            f"score {default['score']:.4f} with the previous setting -> {best['score']:.4f}{stopped} (every row: "
            f"{Path(args.output_dir) / 'tuning.json'}){where}"), report["saved"]


def fold_list(text: str, overrides: dict[str, Any]) -> list[int]:
    """The folds ``--folds`` names ('all', or numbers separated by commas) of ``num_folds``.

    Raises:
        SettingsError: not that form, a fold outside 0..num_folds-1, or a setting --folds cannot go with.
    """
    from pipeline.utils.errors import SettingsError

    num = int(_train_setting(overrides, "num_folds"))
    clash = [k for k in ("fold", "model_path", "resume_from", "init_from", "time_limit") if k in overrides]
    if clash:
        msg = (f"--folds {text}: not with --{clash[0]} (run one fold at a time with --fold K --ckpt_dir DIR/fold_K "
               "for that)")
        raise SettingsError(msg)
    if text.strip().lower() == "all":
        return list(range(num))
    try:
        folds = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        folds = []
    if not folds or not all(0 <= k < num for k in folds):
        msg = f"--folds {text}: give 'all' or fold numbers from 0 to {num - 1} (num_folds {num}) separated by commas"
        raise SettingsError(msg)
    return folds


def _cross_validate(folds: list[int], root: Path, train_overrides: dict[str, Any],
                    args: argparse.Namespace) -> tuple[int, list[Path], dict[str, Any] | None]:
    """Train each fold into ``ckpt_dir/fold_<k>`` (skipped when complete, else resumed: the ordinary training run
    with ``fold: k``), score its ``model.pt`` on the fold's validation cases (``evaluate.yaml``: every case, the
    inference settings, the masks kept in ``output_dir/fold_<k>/oof``), and join the folds' tables into the
    cross-validation score (:func:`pipeline.evaluation.report.cross_validation`).

    Returns:
        The exit code (non-zero: a fold's training failed, nothing after it ran), the folds' model files and the
        cross-validation table.
    """
    from pipeline.utils.memory import run_apart

    num = int(_train_setting(train_overrides, "num_folds"))
    models, reports = [], {}
    for k in folds:
        fold = {**train_overrides, "fold": k, "ckpt_dir": str(Path(args.ckpt_dir) / f"fold_{k}"),
                "output_dir": str(Path(args.output_dir) / f"fold_{k}")}
        if not args.skip_training and not run_apart(_training_complete, fold):
            with _Stage(f"checking fold {k}'s settings and building its volume store"):
                run_apart(_prepare_training, fold)
            with _Stage(f"training fold {k} ({folds.index(k) + 1} of {len(folds)})") as stage:
                rc = _train(fold, args)
                if rc != 0:
                    stage.what = f"training fold {k} failed (exit code {rc})"
            if rc != 0:
                print(f"error: training fold {k} failed (exit code {rc}; rank logs in {fold['output_dir']}/logs): "
                      "not scoring or predicting", file=sys.stderr)
                return rc, models, None
        model = Path(fold["ckpt_dir"]) / "model.pt"
        if not model.is_file():
            print(f"error: {model}: fold {k} has no model (train it: leave --skip_training out)", file=sys.stderr)
            return 2, models, None
        reports[k] = run_apart(_score_fold, k, model, fold)  # its memory is not held while the next fold trains
        models.append(model)
    from pipeline.data.datalist import prepare_datalists
    from pipeline.evaluation.report import cross_validation

    lists = prepare_datalists(root, check=False)
    return 0, models, cross_validation(args.output_dir, reports, lists["train"] + lists["val"],
                                       complete=len(folds) == num)


def _score_fold(k: int, model: Path, fold: dict[str, Any]) -> Path:
    """``evaluate.yaml`` on fold ``k``'s validation cases with its ``model``: ``output_dir/fold_<k>/metrics.json``
    (kept when it scored this very file, so that an interrupted cross-validation does not score a fold twice)."""
    from pipeline.evaluation.tune import EVALUATE_CONFIGS

    out = Path(fold["output_dir"])
    report = out / "metrics.json"
    if (report.is_file() and report.stat().st_mtime >= model.stat().st_mtime
            and json.loads(report.read_text()).get("settings", {}).get("model_path") == str(model)):
        print(f"[pipeline] fold {k}: {model} scored already ({report})", flush=True)
        return report
    configs = [CONFIGS / c for c in EVALUATE_CONFIGS]
    keys = {k2: v for k2, v in route_overrides(fold, *configs).items() if k2.split("#", 1)[0] not in FROM_MODEL_FILE}
    keys.update(model_path=str(model), val_max_cases=None, pred_dir=str(out / "oof"))
    with _Stage(f"scoring fold {k}'s model on its validation cases (out of fold)"):
        _bundle_run("evaluating", configs, keys)
    return report


def _cut_by_clock(overrides: dict[str, Any]) -> str | None:
    """After a training that exited 0: None when it finished its schedule, else where the clock cut it."""
    from pipeline.training.checkpoint import completed_epochs, find_latest_checkpoint

    epochs = _configured_epochs(overrides)
    done = completed_epochs(overrides["ckpt_dir"])
    if done and (epochs is None or done >= epochs):
        return None
    latest = find_latest_checkpoint(overrides["ckpt_dir"])
    of = f"{epochs} epochs" if epochs is not None else "the epochs it chose (epochs: auto)"
    return f"stopped at {latest.name} of {of}" if latest is not None else f"before epoch 1 of {of}"


def _summary(seconds: float, root: Path, out: Path, ckpt_dir: Path, model: Path | str) -> str:
    """Every output of the job, pictures included, one per line."""
    from pipeline.training.runs import latest_run

    run = latest_run(out)
    lines = [
        f"done in {seconds:.0f} s",
        f"  dataset:        {root}",
        f"  model:          {model}",
        f"  checkpoints:    {ckpt_dir}",
        f"  submission:     {out / 'submission.zip'}",
        f"  predictions:    {out / 'predictions'}",
        f"  overlays:       {out / 'overlays'}/<id>_overlay.png  (CT with the predicted surface, test volumes)",
    ]
    if run is not None:
        lines += [
            f"  training run:   {run}  (also {out / 'latest_run'})",
            f"  curves:         {run / 'training_curves.png'}",
            f"  history:        {run / 'training_history.csv'}, training_history.json",
            f"  val overlays:   {run / 'overlays'}/<id>_overlay.png  (prediction beside the label, last validation)",
            f"  TensorBoard:    tensorboard --logdir {out / 'runs'}",
        ]
    return "\n".join(lines)


def _train_setting(overrides: dict[str, Any], key: str) -> Any:
    """A top-level value of train.yaml, as the overrides set it."""
    if key in overrides:
        return overrides[key]
    with open(TRAIN_CONFIG) as f:
        return yaml.safe_load(f)[key]


def _configured_epochs(overrides: dict[str, Any]) -> int | None:
    """train.yaml's ``epochs`` with the overrides; None for ``auto`` (the run fixes it, the final checkpoint says)."""
    epochs = _train_setting(overrides, "epochs")
    return None if epochs == "auto" else int(epochs)


def _training_complete(overrides: dict[str, Any]) -> bool:
    """Whether ``checkpoint_final.pt`` already holds the configured number of epochs (then training is skipped;
    otherwise the bundle resumes from the newest checkpoint by itself)."""
    from pipeline.training.checkpoint import completed_epochs

    epochs = _configured_epochs(overrides)
    done = completed_epochs(overrides["ckpt_dir"])
    if done and done >= (epochs or done) and (Path(overrides["ckpt_dir"]) / "model.pt").is_file():
        print(f"training already complete ({done}/{epochs or done} epochs): skipping to inference", flush=True)
        return True
    return False


def _train(overrides: dict[str, Any], args: argparse.Namespace) -> int:
    from pipeline.cli import launch

    return launch.launch(
        [str(TRAIN_CONFIG)],
        "training",
        route_overrides(overrides, TRAIN_CONFIG, MULTI_GPU_CONFIG),  # the mixin's own keys too (partition_cache)
        nproc=args.nproc,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
        cuda=args.cuda,
    )


def _infer(overrides: dict[str, Any], args: argparse.Namespace) -> int:
    """Inference in this process, or under torchrun on ``--nproc`` processes (default: every GPU) and nodes."""
    from pipeline.cli import launch

    if args.nproc == 1 and args.nnodes == 1:
        _bundle_run("inference", INFER_CONFIG, overrides)
        return 0
    return launch.launch(
        [str(INFER_CONFIG)], "inference", overrides, nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint, mixin=None, cuda=args.cuda,
    )


def run_synth(argv: list[str]) -> int:
    """``python -m pipeline synth --out DIR``: write a synthetic dataset in the Kaggle layout."""
    args = cli.synth_parser().parse_args(argv)
    from pipeline.data.synth import SynthConfig, generate_dataset

    sizes = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test)) if v is not None}
    try:
        out = generate_dataset(args.out, SynthConfig(seed=args.seed, difficulty=args.difficulty, **sizes))
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def run_configs(argv: list[str]) -> int:
    """``python -m pipeline configs``: print the folder of the bundle's configs."""
    cli.configs_parser().parse_args(argv)
    print(CONFIGS)
    return 0


# command -> (its light parser, whether it takes --<bundle key> overrides, the module whose main() runs it)
_SUBCOMMANDS = {
    "score": (cli.score_parser, False, "pipeline.cli.score"),
    "tune": (cli.tune_parser, True, "pipeline.cli.tune"),
    "predict": (cli.predict_parser, True, "pipeline.cli.predict"),
    "merge": (cli.merge_parser, False, "pipeline.cli.merge"),
    "wheelhouse": (cli.wheelhouse_parser, False, "pipeline.cli.wheelhouse"),
}


def main(argv: list[str] | None = None) -> int:
    """Run a command; every failure ends in one ``error:`` line and the exit code of
    :func:`pipeline.utils.errors.one_line`: 2 for bad input or settings, 1 for the environment (disk, permission)."""
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else ("run", argv)
    if command == "run":
        return run_reporting_errors(run_main_job, rest)
    if command == "synth":
        return run_reporting_errors(run_synth, rest)
    if command == "configs":
        return run_reporting_errors(run_configs, rest)
    if command in _SUBCOMMANDS:
        parser, overrides, module = _SUBCOMMANDS[command]
        # --help and argument errors answered before torch is imported
        parser().parse_known_args(rest) if overrides else parser().parse_args(rest)
        return run_reporting_errors(lambda args: importlib.import_module(module).main(args), rest)
    print(f"error: unknown command {command!r}{suggest(command, COMMANDS)}; use {', '.join(COMMANDS)} "
          "(python -m pipeline --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
