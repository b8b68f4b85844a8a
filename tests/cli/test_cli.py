"""The command lines answer --help, argument errors and unknown keys at once (before torch), with suggestions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import parsers as cli
from pipeline.utils.errors import suggest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"
BUNDLE_MAIN = str(Path("/x/site-packages/monai/bundle/__main__.py"))

_PROBE = """
import sys
from pipeline.cli.main import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print("TORCH_LOADED" if "torch" in sys.modules or "monai" in sys.modules else "LIGHT", rc)
"""


def _probe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(
    ("args", "rc", "expected"),
    [
        (["--help"], 0, "--key value"),
        (["synth", "--help"], 0, "--n_train"),
        (["score", "--help"], 0, "--labels"),
        (["tune", "--help"], 0, "--grid_threshold"),
        (["predict", "--help"], 0, "--num_parts"),
        (["merge", "--help"], 0, "--pred_dir"),
        (["configs"], 0, str(CONFIGS)),
        (["configs", "--help"], 0, "--config_file"),
        (["wheelhouse", "--help"], 0, "--find-links"),
        (["wheelhouse"], 2, "dir"),
        (["predict", "--output", "x.zarr"], 2, "--input"),
        (["--epoch", "3"], 2, "did you mean 'epochs'?"),
        (["--dataset_dir", "/nonexistent/vesuvius"], 2, "/nonexistent/vesuvius: dataset folder not found"),
        (["--nproc", "two"], 2, "invalid int value"),
        (["score", "--pred", "x.zip"], 2, "--labels"),
        (["tune", "--grid_threshold", "0.5,high"], 2, "'high' is not a float"),
        (["scor"], 2, "did you mean 'score'?"),
    ],
)
def test_answered_before_torch_is_imported(args: list[str], rc: int, expected: str) -> None:
    proc = _probe(*args)
    assert proc.stdout.splitlines()[-1] == f"LIGHT {rc}", proc.stdout + proc.stderr
    assert expected in proc.stdout + proc.stderr


def test_main_help_lists_commands_overrides_and_help_for_every_option() -> None:
    parser = cli.main_parser()
    text = parser.format_help()
    for command in ("synth", "score", "tune", "predict", "merge", "configs", "wheelhouse"):
        assert f"\n  {command} " in text
    assert "--epochs 200" in text and "--train#dataloader#num_workers 2" in text
    parsers = (cli.main_parser(), cli.synth_parser(), cli.score_parser(), cli.tune_parser(), cli.predict_parser(),
               cli.merge_parser(), cli.configs_parser(), cli.wheelhouse_parser())
    for parser in parsers:
        for action in parser._actions:
            assert action.help, (parser.prog, action.option_strings)


def test_tune_help_defaults_are_the_grids() -> None:
    from pipeline.evaluation.tune import SweepGrid

    grid = SweepGrid()
    for action in cli.tune_parser()._actions:
        name = action.dest.removeprefix("grid_")
        if action.dest.startswith("grid_"):
            shown = action.help.rsplit("default: ", 1)[1].rstrip(")")
            assert action.type(shown) == getattr(grid, name), name


def test_suggestions() -> None:
    known = cli.config_keys(CONFIGS / "train.yaml", CONFIGS / "inference.yaml")
    assert suggest("epoch", known) == " (did you mean 'epochs'?)"
    assert suggest("learningrate", known) == " (did you mean 'learning_rate'?)"
    assert suggest("zzzzqqq", known) == ""
    message = cli.unknown_keys_message({"epoch": 3, "train#dataloader#num_workers": 2, "pach_size#0": 1}, known, "x")
    assert message == "unknown setting(s) 'epoch' (did you mean 'epochs'?), 'pach_size#0' (did you mean " \
                      "'patch_size'?): not a key of x"


def test_bundle_cli_check() -> None:
    train, mixin = str(CONFIGS / "train.yaml"), str(CONFIGS / "multi_gpu_train.yaml")
    ok = [BUNDLE_MAIN, "run", "training", "--config_file", train, "--epochs", "3", "--train#dataloader#shuffle",
          "False", "--meta_file=m.json", "--amp"]
    cli.check_bundle_cli(ok)
    cli.check_bundle_cli([BUNDLE_MAIN, "run", f"--config_file=['{train}','{mixin}']", "--partition_cache", "True"])
    cli.check_bundle_cli(["python -m pipeline", "--epoch", "3"])  # not the monai.bundle command line: not checked
    with pytest.raises(SystemExit) as exit_info:
        cli.check_bundle_cli([BUNDLE_MAIN, "run", "--config_file", train, "--partition_cache", "True"])
    assert exit_info.value.code == 2
    for flag in (["--ema", "false"], ["--ema=true"], ["--val_score", "FALSE"]):
        with pytest.raises(SystemExit):  # a truthy string to fire: the opposite of what was meant for 'false'
            cli.check_bundle_cli([BUNDLE_MAIN, "run", "--config_file", train, *flag])
    assert cli.lowercase_bools_message(["--ema", "false", "--tta", "True"]) == (
        "--ema false (write --ema False): on the monai.bundle command line 'true'/'false' are strings, and any "
        "non-empty string counts as true"
    )
    assert cli.lowercase_bools_message(["--amp", "--progress", "log", "--ema", "False"]) is None


def test_bundle_command_line_refuses_an_unknown_key(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.yaml"),
         "--epoch", "3", "--output_dir", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: unknown setting(s) 'epoch' (did you mean 'epochs'?): not a key of train.yaml"
    )
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "args",
    [
        ["score", "--pred", "{missing}/submission.zip", "--labels", "{missing}/labels"],
        ["merge", "--pred_dir", "{missing}/part0", "--dataset_dir", "{missing}/data"],
        ["predict", "--input", "{missing}/volume.zarr", "--output", "{tmp}/out.zarr", "--model_path", "{missing}/m.pt"],
        ["tune", "--dataset_dir", "{missing}/data", "--ckpt_dir", "{missing}/models"],
        ["synth", "--out", "{tmp}"],  # exists already: refused, nothing overwritten
        ["--dataset_dir", "{missing}/data"],
    ],
    ids=["score", "merge", "predict", "tune", "synth", "main job"],
)
def test_bad_input_exits_2_with_one_line_on_every_command(tmp_path: Path, capsys, args: list[str]) -> None:
    from pipeline.cli.main import main

    missing = tmp_path / "missing"
    argv = [a.format(missing=missing, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and str(tmp_path) in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_environment_failures_exit_1_on_every_command(tmp_path: Path, capsys, monkeypatch) -> None:
    """Disk full or no permission is the machine's problem, not the input's: exit 1, one line naming the path."""
    import errno

    import pipeline.data.synth as synth
    from pipeline.cli.main import main
    from pipeline.utils.errors import DiskError

    out = tmp_path / "synthetic"
    for failure in (PermissionError(errno.EACCES, "Permission denied", str(out)),
                    DiskError(errno.ENOSPC, f"{out}: not enough disk space: about 10 bytes needed, 0 bytes free")):
        def fail(*args, failure=failure, **kwargs):
            raise failure

        monkeypatch.setattr(synth, "generate_dataset", fail)
        assert main(["synth", "--out", str(out)]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {out}")


def test_score_on_a_missing_folder_exits_2_from_the_command_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "score", "--pred", str(tmp_path / "nope"), "--labels", str(tmp_path / "no")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and str(tmp_path) in proc.stderr


def test_wheelhouse_needs_the_checkout(tmp_path: Path, capsys, monkeypatch) -> None:
    """An installed wheel holds no source to build the project's wheel from: one line, exit 2."""
    import pipeline.cli.wheelhouse as wheelhouse
    from pipeline.cli.main import main

    monkeypatch.setattr(wheelhouse, "INSTALLED_BUNDLE", wheelhouse.BUNDLE)
    assert main(["wheelhouse", str(tmp_path / "wheels")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
