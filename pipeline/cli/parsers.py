"""The command lines' argument parsers and key checks, importable without torch or MONAI.

``python -m pipeline ... --help`` and argument errors are answered from here before anything heavy is imported
(torch + MONAI take seconds to import, tens of seconds on a busy machine). :func:`check_bundle_cli` gives the
``python -m monai.bundle`` command line the same unknown-key check as ``python -m pipeline``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from pipeline.utils.config import (
    CONFIGS,
    YAML_LOADER,
    config_keys,
    unknown_keys_message,
)
from pipeline.utils.paths import BUNDLE, models_dir, output_root

__all__ = [
    "BUNDLE_ARGS",
    "check_bundle_cli",
    "config_keys",
    "configs_parser",
    "load_recipe",
    "lowercase_bools_message",
    "main_parser",
    "merge_parser",
    "predict_parser",
    "recipe_names",
    "score_parser",
    "synth_parser",
    "tune_parser",
    "unknown_keys_message",
    "wheelhouse_parser",
    "with_recipe",
]

# what monai.bundle's `run` takes itself, next to the config keys it overrides
BUNDLE_ARGS = frozenset(
    {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
     "workflow_name", "workflow_type", "properties_path"}
)

_MAIN_EPILOG = """\
commands:
  (none)    the main job: train or resume, then predict (the options above)
  synth     write a synthetic dataset in the Kaggle layout      python -m pipeline synth --help
  score     competition score of predicted masks vs labels      python -m pipeline score --help
  tune      sweep threshold + post-processing on validation     python -m pipeline tune --help
  predict   stream a large volume (zarr/TIFF) block by block    python -m pipeline predict --help
  merge     zip and check the parts of a --num_parts run        python -m pipeline merge --help
  configs   print the bundle's configs folder                   python -m pipeline configs
  wheelhouse  wheels for an offline install                     python -m pipeline wheelhouse --help

bundle settings: any key of bundle/configs/train.yaml, multi_gpu_train.yaml or inference.yaml, as --key value
(or --key=value); values are Python/YAML literals, nested keys use '#'. A key no config has is refused, with
the closest known key suggested.

examples:
  python -m pipeline                                      synthetic data, train.yaml's schedule, then inference
  python -m pipeline --dataset_dir /data/vesuvius --epochs 200
  python -m pipeline --patch_size "[128,128,128]" --tta true --threshold 0.5
  python -m pipeline --train#dataloader#num_workers 2     a nested key
  python -m pipeline --skip_training                      predict with the existing model.pt
  python -m pipeline --nproc 2                            2 DDP processes (gloo on CPU)
  python -m pipeline --recipe kaggle_2xT4 --dataset_dir /kaggle/input/...   the Kaggle 2xT4 settings
  python -m pipeline --resume_from /kaggle/input/NOTEBOOK/models   continue a run from a read-only copy of its ckpt_dir
  python -m pipeline --init_from M.pt --ckpt_dir models_ft   a new run from a model's weights (fine-tuning)
  python -m pipeline --folds all --num_folds 3            3-fold cross-validation, then the folds' ensemble
"""


def main_parser() -> argparse.ArgumentParser:
    """The main job's parser (``python -m pipeline [options] [--<bundle key> VALUE ...]``)."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline",
        usage="python -m pipeline [synth|score|tune|predict|merge|configs|wheelhouse] [options] "
        "[--<bundle key> VALUE ...]",
        description="Check the dataset, train (or resume; skipped when checkpoint_final.pt holds the configured "
        "epochs), then predict the test volumes and write submission.zip.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset_dir", default=None, help="Kaggle layout folder; default: synthetic scrolls")
    p.add_argument("--output_dir", default=str(Path(output_root(BUNDLE)) / "outputs"),
                   help="logs, run folders (curves, TensorBoard), predictions, submission.zip (default: %(default)s)")
    p.add_argument("--ckpt_dir", default=models_dir(BUNDLE),
                   help="model.pt and the training checkpoints; resume reads it (default: %(default)s)")
    p.add_argument("--synthetic_dir", default=str(Path(output_root(BUNDLE)) / "data" / "synthetic"),
                   help="where the synthetic default dataset is generated when no --dataset_dir is given "
                   "(default: %(default)s)")
    p.add_argument("--skip_training", action="store_true", help="predict with the existing model.pt")
    p.add_argument("--no_tune", action="store_true",
                   help="after training, predict with the model file's post-processing as it is; by default the job "
                   "sweeps threshold and post-processing on the validation cases (python -m pipeline tune's sweep, "
                   "within --time_limit) and predicts with the best")
    p.add_argument("--folds", default=None,
                   help="cross-validation: train fold by fold ('all', or '0,2' of num_folds) into ckpt_dir/fold_<k> "
                   "(each resumable), score each fold's model on its validation cases (out-of-fold: every training "
                   "case once, output_dir/cross_validation.csv), then predict with the folds' ensemble")
    p.add_argument("--tune_time", default="30m",
                   help="the longest the post-processing sweep after training may take (seconds or a duration such as "
                   "1h30m, none for no bound; within --time_limit too): it starts no volume that would not be scored "
                   "in full by then and ranks on those that were (default: %(default)s)")
    p.add_argument("--recipe", default=None,
                   help=f"settings for a machine: a name in bundle/configs/recipes ({', '.join(recipe_names())}) or a "
                   "YAML file of bundle keys; --key value options still win")
    p.add_argument("--nproc", type=int, default=None, help="processes for DDP training and inference (default: all GPUs)")
    p.add_argument("--nnodes", type=int, default=1, help="machines in a multi-node job; run the command on each")
    p.add_argument("--node_rank", type=int, default=0, help="this machine's index in a multi-node job, 0..nnodes-1")
    p.add_argument("--rdzv_endpoint", default=None, help="host:port of node 0, for several machines")
    return p


def recipe_names() -> list[str]:
    """The recipes shipped in ``bundle/configs/recipes``."""
    return sorted(path.stem for path in (CONFIGS / "recipes").glob("*.yaml"))


def load_recipe(recipe: str) -> dict[str, Any]:
    """The bundle keys of a recipe: a name in ``bundle/configs/recipes`` or a YAML file (a mapping of keys).

    The same file is a mixin for ``python -m monai.bundle run training --config_file "['.../train.yaml', RECIPE]"``.

    Raises:
        ValueError: no such recipe, or a file that is not a mapping of keys (the message names the file).
    """
    path = Path(recipe) if recipe.endswith((".yaml", ".yml", ".json")) else CONFIGS / "recipes" / f"{recipe}.yaml"
    if not path.is_file():
        msg = f"{path}: recipe not found; the bundle's recipes are {', '.join(recipe_names())}, or give a YAML file"
        raise ValueError(msg)
    try:
        values = yaml.load(path.read_text(), Loader=YAML_LOADER)
    except yaml.YAMLError as e:
        msg = f"{path}: not valid YAML ({str(e).splitlines()[0]})"
        raise ValueError(msg) from e
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        msg = f"{path}: a recipe is a mapping of bundle keys to values"
        raise ValueError(msg)
    return values


def with_recipe(recipe: str, overrides: dict[str, Any], known: Iterable[str], where: str) -> dict[str, Any]:
    """``overrides`` on top of the recipe's keys (the command line wins), every recipe key checked against ``known``.

    Raises:
        ValueError: a recipe :func:`load_recipe` refuses, or one with a key no config has (named, with the file).
    """
    values = load_recipe(recipe)
    unknown = unknown_keys_message(values, known, where)
    if unknown:
        msg = f"recipe {recipe}: {unknown}"
        raise ValueError(msg)
    return {**values, **overrides}


def synth_parser() -> argparse.ArgumentParser:
    """``python -m pipeline synth``'s parser."""
    p = argparse.ArgumentParser(prog="python -m pipeline synth", description="Write synthetic scroll volumes.")
    p.add_argument("--out", required=True, help="folder to create (must not exist)")
    p.add_argument("--seed", type=int, default=0, help="everything is derived from it (default: %(default)s)")
    p.add_argument("--n_train", type=int, default=None, help="training volumes with labels (default: 12)")
    p.add_argument("--n_test", type=int, default=None, help="test volumes without labels (default: 3)")
    p.add_argument("--difficulty", default="easy",
                   help="easy: evenly spaced spiral wraps (the demo's and the tests' scrolls); hard: also wraps 1-3 "
                   "voxels apart and touching, a crossing flap, varying thickness, air slits inside sheets, "
                   "intensity drift, unlabeled blocks where wraps are closest (default: %(default)s)")
    return p


def score_parser() -> argparse.ArgumentParser:
    """``python -m pipeline score``'s parser."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline score",
        description="Vesuvius surface-detection competition score. TopoScore is exact by default: the same "
        "Betti-matching counts as the official metric (Betti-Matching-3D per octant).",
    )
    p.add_argument("--pred", required=True, type=Path, help="submission.zip or folder of <id>.tif masks")
    p.add_argument("--labels", required=True, type=Path, help="folder of <id>.tif labels (0/1/2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--topo_mode",
        choices=("exact", "fast"),
        default="exact",
        help="exact (default): the official TopoScore (Betti-Matching-3D's counts); fast: closed-form estimate "
        "of the matched features, for following training only",
    )
    return p


def _values(cast: type) -> Any:
    def parse(text: str) -> tuple:
        out = []
        for item in text.split(","):
            item = item.strip()
            if cast is bool:
                if item.lower() not in ("true", "false", "1", "0"):
                    msg = f"{item!r} is not a boolean (true/false)"
                    raise argparse.ArgumentTypeError(msg)
                out.append(item.lower() in ("true", "1"))
            elif item.lower() in ("none", "null", "off"):
                out.append(None)
            else:
                try:
                    out.append(cast(item))
                except ValueError:
                    msg = f"{item!r} is not a {cast.__name__} (give comma-separated values, e.g. 0.3,0.5)"
                    raise argparse.ArgumentTypeError(msg) from None
        return tuple(out)

    return parse


def tune_parser() -> argparse.ArgumentParser:
    """``python -m pipeline tune``'s parser; a grid option left out (None) takes ``SweepGrid``'s default."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline tune",
        description="Sweep threshold and post-processing on the validation split; print the best setting. Settings are "
        "ranked by the exact competition score (TopoScore with the official Betti-matching counts).",
        epilog="Other --key value pairs override bundle keys of train.yaml/evaluate.yaml (--model_path, --overlap, "
        "...); the network and the patch come from the model file.",
    )
    p.add_argument("--dataset_dir", default=None, help="Kaggle layout folder; default: the bundle's (synthetic)")
    p.add_argument("--ckpt_dir", default=None, help="folder of model.pt; default: the bundle's")
    p.add_argument("--output_dir", default=None, help="where tuning.json goes; default: the bundle's")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation (as inference --tta True)")
    p.add_argument("--workers", type=int, default=1, help="processes scoring settings in parallel")
    p.add_argument("--top", type=int, default=10, help="rows of the printed table")
    p.add_argument("--max_settings", type=int, default=400, help="refuse grids larger than this")
    p.add_argument("--no_save", action="store_true",
                   help="print the best setting only; by default it is written into the model file's plans (an "
                   "ensemble: into its ensemble file, else output_dir/ensemble.json)")
    p.add_argument("--folds", default=None,
                   help="a cross-validation in ckpt_dir/fold_<k> ('all', or '0,2' of num_folds): choose on the folds' "
                   "out-of-fold predictions (each training case once, by the fold model that did not see it) and "
                   "write the folds' ensemble with it to ckpt_dir/ensemble.json")
    p.add_argument("--grid_threshold", type=_values(float), default=None,
                   help="e.g. 0.3,0.5,0.7 (default: 0.3,0.4,0.5,0.6,0.7,0.8)")
    p.add_argument("--grid_hysteresis_high", type=_values(float), default=None, help="none,0.85 (default: none,0.85)")
    p.add_argument("--grid_closing_radius", type=_values(int), default=None, help="e.g. 0,1 (default: 0,1)")
    p.add_argument("--grid_plug_holes", type=_values(bool), default=None, help="e.g. false,true (default: false,true)")
    p.add_argument("--grid_min_size", type=_values(int), default=None,
                   help="e.g. 0,1000,20000 (default: 0,1000,20000)")
    return p


def _cli_keys(argv: list[str]) -> list[str]:
    keys = []
    for arg in argv:
        if arg == "--":
            break
        if arg.startswith("--") and len(arg) > 2:
            keys.append(arg[2:].partition("=")[0])
    return keys


def _config_files(value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [v for v in value.split(",") if v]
    return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def check_bundle_cli(argv: list[str] | None = None) -> None:
    """Refuse ``--key`` arguments of a ``python -m monai.bundle run`` command line that no config has, and
    ``--key false`` (:func:`lowercase_bools_message`).

    MONAI adds an unknown key to the config silently (``--epoch 3`` trains all the default epochs), so the configs
    call this first in ``initialize``. It does nothing unless this process is the ``monai.bundle`` command line
    (``sys.argv[0]`` is its ``__main__``, also under torchrun); ``python -m pipeline`` checks its own keys. Keys
    given through ``--args_file`` are not checked.

    Args:
        argv: the command line to check; default ``sys.argv``.

    Raises:
        SystemExit: code 2 after one ``error:`` line on stderr naming the unknown keys and the closest known one of
            each (an exception would reach the user inside MONAI's long "Failed to evaluate" traceback).
    """
    argv = sys.argv if argv is None else argv
    if not argv or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py"):
        return
    args = argv[1:]
    files: list[str] = []
    for i, arg in enumerate(args):
        if arg.startswith("--config_file"):
            _, eq, value = arg.partition("=")
            files = _config_files(value if eq else (args[i + 1] if i + 1 < len(args) else ""))
    if not files:
        return
    known = config_keys(*files) | BUNDLE_ARGS | {"_meta_"}
    message = unknown_keys_message(_cli_keys(args), known, " or ".join(Path(f).name for f in files))
    if message is None:
        message = lowercase_bools_message(args)
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def lowercase_bools_message(argv: list[str]) -> str | None:
    """One line for ``--key false`` / ``--key=true`` pairs, or None.

    The ``monai.bundle`` command line (python-fire) reads ``False``/``True`` as booleans but ``false``/``true`` as
    strings, and a non-empty string counts as true: ``--ema false`` would switch the EMA on.
    """
    bad = []
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or arg == "--":
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
        if value.lower() in ("true", "false") and value not in ("True", "False"):
            bad.append(f"--{key} {value} (write --{key} {value.capitalize()})")
    if not bad:
        return None
    return (f"{', '.join(bad)}: on the monai.bundle command line 'true'/'false' are strings, and any non-empty string "
            "counts as true")


def predict_parser() -> argparse.ArgumentParser:
    """``python -m pipeline predict``'s parser; other ``--key value`` pairs override inference.yaml's keys."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline predict",
        description="Streaming prediction of volumes larger than memory, block by block, resumable.",
        epilog="Other --key value pairs override inference.yaml's keys (patch_size, tta, threshold, ...).",
    )
    p.add_argument("--input", required=True, help="zarr array, OME-Zarr, 3D TIFF, or a folder of them")
    p.add_argument("--output", required=True, help="output zarr (a folder of <name>.zarr for a folder input)")
    p.add_argument("--model_path", nargs="+", default=None,
                   help="model file (default: inference.yaml's model_path); several, or an ensemble.json: an ensemble "
                   "whose probabilities are averaged, weighted by --model_weights \"[w1, w2, ...]\" (default: the "
                   "ensemble file's, else equal)")
    p.add_argument("--num_parts", type=int, default=1, help="split the blocks over this many machines")
    p.add_argument("--part_id", type=int, default=0, help="this machine's part, 0 .. num_parts - 1")
    p.add_argument("--block_size", type=int, nargs="+", default=[256], help="block (Z Y X, or one for all)")
    p.add_argument("--chunk_size", type=int, nargs="+", default=[128], help="output chunk (Z Y X, or one)")
    p.add_argument("--probabilities", choices=("none", "uint8", "float16"), default="none",
                   help="also write probabilities in this dtype")
    p.add_argument("--cache_mb", type=int, default=1024, help="memory for window outputs shared by blocks")
    return p


def merge_parser() -> argparse.ArgumentParser:
    """``python -m pipeline merge``'s parser."""
    p = argparse.ArgumentParser(prog="python -m pipeline merge", description="Zip and check the parts' masks.")
    p.add_argument("--pred_dir", nargs="+", default=[str(Path(output_root(BUNDLE)) / "outputs" / "predictions")],
                   help="the parts' predictions folders (default: %(default)s)")
    p.add_argument("--dataset_dir", default=None, help="the test set the parts predicted; default: synthetic")
    p.add_argument("--synthetic_dir", default=str(Path(output_root(BUNDLE)) / "data" / "synthetic"),
                   help="the synthetic default dataset (default: %(default)s)")
    p.add_argument("--output", default=str(Path(output_root(BUNDLE)) / "outputs" / "submission.zip"),
                   help="the submission to write (default: %(default)s)")
    return p


def configs_parser() -> argparse.ArgumentParser:
    """``python -m pipeline configs``'s parser."""
    return argparse.ArgumentParser(
        prog="python -m pipeline configs",
        description="Print the folder of the bundle's configs (train.yaml, inference.yaml, recipes/, ...): the "
        "installed copy, or the checkout's bundle/configs. E.g. python -m monai.bundle run training --config_file "
        '"$(python -m pipeline configs)/train.yaml"',
    )


def wheelhouse_parser() -> argparse.ArgumentParser:
    """``python -m pipeline wheelhouse``'s parser."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline wheelhouse",
        description="From a checkout, with the network on, in the environment an offline install will go to (on "
        "Kaggle: a notebook with internet, same image): build the project's wheel into DIR and add the wheels of the "
        "dependencies this environment lacks (installed ones, torch among them, are left out). Offline: pip install "
        "--no-index --find-links DIR vesuvius-bundle",
    )
    p.add_argument("dir", help="folder for the wheels (created; upload it as a dataset)")
    return p
