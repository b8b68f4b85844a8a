"""Malformed datasets, each made by breaking a copy of a good one, and the command lines that must refuse them.

``python -m tests._bad_inputs [DATASET_DIR]`` runs every case through ``python -m pipeline`` and ``python -m
monai.bundle run training|inference`` and prints a table of exit codes and last lines (the figures of issue 10).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

from tests.conftest import TINY_INFER, TINY_TRAIN, cli_args
from transforms.io import read_volume

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "bundle" / "configs"
# side outputs that do not matter for these tests, off to keep each run short
QUIET_TRAIN = {"val_score": False, "training_curves": False, "tensorboard_preview": False, "monitor_resources": False}


def _first(ds: Path, folder: str) -> Path:
    return sorted((ds / folder).iterdir())[0]


def _first_training(ds: Path) -> Path:
    """The first image of the training split the bundle makes (not the validation side): what its patch check reads."""
    from pipeline.data.datalist import prepare_datalists

    return Path(prepare_datalists(ds, check=False)["train"][0]["image"])


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _float_labels(ds: Path) -> None:
    lab = _first(ds, "train_labels")
    arr = read_volume(lab).astype(np.float32)
    arr[arr == 0], arr[arr == 1], arr[arr == 2] = 0.5, 1.5, 2.5
    tifffile.imwrite(lab, arr)


def _tiny_volume(ds: Path) -> None:
    tifffile.imwrite(_first(ds, "train_images"), np.zeros((2, 3, 3), np.uint8))
    tifffile.imwrite(_first(ds, "train_labels"), np.zeros((2, 3, 3), np.uint8))


def _label_value_7(ds: Path) -> None:
    lab = _first(ds, "train_labels")
    arr = read_volume(lab)
    arr[5, 5, 5] = 7
    tifffile.imwrite(lab, arr)


def _csv_id_without_file(ds: Path) -> None:
    with open(ds / "train.csv", "a") as f:
        f.write("9999,1\n")


def _empty_test(ds: Path) -> None:
    for p in (ds / "test_images").iterdir():
        p.unlink()
    (ds / "test.csv").unlink()


def _no_train_layout(ds: Path) -> None:
    shutil.rmtree(ds / "train_images")
    (ds / "train.csv").unlink()


def _one_case(ds: Path) -> None:
    lines = (ds / "train.csv").read_text().splitlines()
    (ds / "train.csv").write_text("\n".join(lines[:2]) + "\n")


# name -> how to break the dataset (None: the dataset folder itself is missing)
CASES: dict[str, Callable[[Path], None] | None] = {
    "missing dataset folder": None,
    "image without label": lambda ds: _first(ds, "train_labels").unlink(),
    "label shape differs": lambda ds: tifffile.imwrite(
        _first(ds, "train_labels"), read_volume(_first(ds, "train_labels"))[:-1]
    ),
    "2D training image": lambda ds: tifffile.imwrite(_first_training(ds), np.zeros((32, 32), np.uint8)),
    "label value 7": _label_value_7,
    "empty test folder": _empty_test,
    "unreadable training image": lambda ds: _first(ds, "train_images").write_bytes(b"\x00garbage" * 10),
    "unreadable test image": lambda ds: _first(ds, "test_images").write_bytes(b"garbage"),
    "float labels 0.5/1.5/2.5": _float_labels,
    "2x3x3 volume": _tiny_volume,
    "truncated training image": lambda ds: _truncate(_first(ds, "train_images")),
    "truncated test image": lambda ds: _truncate(_first(ds, "test_images")),
    "train.csv id without file": _csv_id_without_file,
    "2D test image": lambda ds: tifffile.imwrite(_first(ds, "test_images"), np.zeros((32, 32), np.uint8)),
    "no train.csv nor train_images/": _no_train_layout,
    "train.csv without id column": lambda ds: (ds / "train.csv").write_text("case,scroll_id\n1,1\n"),
    "float64 image": lambda ds: tifffile.imwrite(
        _first(ds, "train_images"), read_volume(_first(ds, "train_images")).astype(np.float64)
    ),
    "one training case": _one_case,
    "float32 image": lambda ds: tifffile.imwrite(
        _first(ds, "train_images"), read_volume(_first(ds, "train_images")).astype(np.float32)
    ),
}


def broken_copy(good: Path, name: str, where: Path) -> Path:
    """A copy of ``good`` under ``where`` broken as ``CASES[name]`` says (a path that does not exist for None)."""
    ds = where / "ds"
    if CASES[name] is None:
        return where / "missing"
    shutil.copytree(good, ds)
    CASES[name](ds)
    return ds


def run_cli(args: list[str], timeout: int = 300) -> tuple[int, str, str]:
    """Run a command from the repository root; (exit code, last non-empty output line, whole output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()] or [
        line for line in proc.stdout.splitlines() if line.strip()
    ]
    return proc.returncode, (lines[-1] if lines else ""), out


def main_job(ds: Path, root: Path, *extra: str) -> list[str]:
    tiny = [a.replace(" ", "") for a in cli_args({**TINY_TRAIN, **QUIET_TRAIN, "overlays": False})]
    return [sys.executable, "-m", "pipeline", "--dataset_dir", str(ds), "--output_dir", str(root / "out"),
            "--ckpt_dir", str(root / "models"), *tiny, *extra]


def bundle(run_id: str, ds: Path, root: Path, *extra: str, model_dir: Path | None = None) -> list[str]:
    configs = {"training": "train.yaml", "inference": "inference.yaml", "evaluating": "evaluate.yaml"}
    tiny = {**TINY_TRAIN, **QUIET_TRAIN} if run_id != "inference" else {**TINY_INFER, "overlays": False}
    overrides = {**tiny, "dataset_dir": str(ds),
                 "output_dir": str(root / "out"), "ckpt_dir": str(model_dir or root / "models")}
    config = str(CONFIGS / configs[run_id])
    if run_id == "evaluating":  # a mixin over train.yaml
        config = repr([str(CONFIGS / "train.yaml"), config])
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config, *cli_args(overrides), *extra]


TEST_CASES = {"missing dataset folder", "empty test folder", "unreadable test image", "truncated test image",
              "2D test image"}  # what the bundle's inference reads; the others break what training reads


def _in_process(args: list[str], capture: io.StringIO) -> tuple[int, str]:
    """Run ``python -m pipeline ARGS`` or ``python -m monai.bundle ARGS`` in this process (a process start costs
    more than the check itself): the exit code and last line the command prints. The bundle's is what
    ``pipeline.utils.errors.excepthook`` prints, i.e. ``one_line`` of the exception."""
    from pipeline.cli.main import main
    from pipeline.utils.errors import one_line

    with contextlib.redirect_stderr(capture):
        if args[1:3] == ["-m", "pipeline"]:
            rc = main(args[3:])
            lines = [line for line in capture.getvalue().splitlines() if line.strip()]
            return rc, lines[-1] if lines else ""
        import fire
        from monai.bundle import scripts

        try:
            fire.Fire(scripts.run, command=args[4:])
        except BaseException as e:  # noqa: BLE001 - what the interpreter would hand to the excepthook
            line, code, _ = one_line(e)
            return code, line
    return 0, ""


def _sweep(good: Path, model_dir: Path, work: Path) -> None:
    print("| dataset | python -m pipeline | bundle training (evaluating) | bundle inference (--check_data False) |")
    print("| --- | --- | --- | --- |")
    for i, name in enumerate(CASES):
        where = work / f"case{i}"
        where.mkdir(parents=True)
        ds = broken_copy(good, name, where)
        main = _in_process(main_job(ds, where / "main"), io.StringIO())
        cells = [f"{main[0]}: `{main[1]}`", "n/a (reads training data only)", "n/a (reads test images only)"]
        if name not in TEST_CASES or name == "missing dataset folder":
            train = _in_process(bundle("training", ds, where / "bundle"), io.StringIO())
            evaluate = _in_process(bundle("evaluating", ds, where / "eval", model_dir=model_dir), io.StringIO())
            same = "evaluating: same" if evaluate == train else f"evaluating: {evaluate[0]}: `{evaluate[1]}`"
            cells[1] = f"{train[0]}: `{train[1]}` ({same})"
        if name in TEST_CASES:
            infer = _in_process(
                bundle("inference", ds, where / "infer", "--check_data", "False", model_dir=model_dir), io.StringIO()
            )
            cells[2] = f"{infer[0]}: `{infer[1]}`"
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    import tempfile

    import torch
    from monai.bundle import ConfigParser

    from pipeline.data.synth import SynthConfig, generate_dataset
    from pipeline.model.plans import pack_model
    from tests.conftest import TINY_NETWORK, TINY_SHAPES

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        good = Path(sys.argv[1]) if len(sys.argv) > 1 else generate_dataset(
            work / "good", SynthConfig(n_train=5, n_test=2, shapes=TINY_SHAPES, n_scrolls=2, seed=1)
        )
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "train.yaml"))
        parser.update(TINY_NETWORK)
        (work / "models").mkdir()
        net = parser.get_parsed_content("network_def")
        torch.save(pack_model(net.state_dict(), parser.get_parsed_content("plans")), work / "models" / "model.pt")
        _sweep(good, work / "models", work / "cases")
