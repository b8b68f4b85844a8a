"""Installed as the README says -- editable from the checkout, or the wheel offline beside an installed torch -- the
packages import and the commands run from outside the repository.

The nested virtual environments reuse this interpreter's packages (torch, MONAI, pip, setuptools) and install only
this project, offline. They pass in the global interpreter and inside a virtual environment alike:
``--system-site-packages`` shows a new venv the *base* interpreter's packages, never those of a venv that runs the
tests, so a ``.pth`` file adds the running interpreter's own site-packages (``_venv``). Building the project needs
setuptools >= 70.1 (or >= 64 with ``wheel``) to stay offline; with an older one, as a fresh Python 3.11 venv has
(setuptools 65.5, no ``wheel``), pip fetches a build backend from the index and only the build uses the network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

from pipeline.cli.wheelhouse import builds_offline
from tests.conftest import TINY_TRAIN

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
WHEEL = f"vesuvius_bundle-{VERSION}-py3-none-any.whl"


def _venv(path: Path) -> Path:
    """A virtual environment at ``path`` that sees this interpreter's packages; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)], check=True,
                   timeout=120)
    python = path / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    # addsitedir, not a bare path: the running environment's own .pth files (an editable install) count too
    (Path(site) / "_running_interpreter.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
    return python


def _offline() -> list[str]:
    """``unshare -n`` (a process with no network) where this machine allows it, else nothing (pip's ``--no-index``
    keeps the install offline all the same)."""
    if shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30, check=False)
    return ["unshare", "-n"] if probe.returncode == 0 else []


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without PYTHONPATH (the installed copy, not the checkout) and without pip's settings from
    this machine (its find-links and indexes): pip sees only what a test gives it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "OMP_NUM_THREADS": "2", **extra}


def _run(args: list, cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, " ".join(map(str, args)) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_editable_install_works_from_another_directory(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    python = _venv(tmp_path / "venv")
    # only this project is installed, as the requirements' `-e .` does
    build = ["--no-build-isolation", "--no-index"] if builds_offline() else []
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", *build, "-e", REPO], cwd=tmp_path, env=_clean_env())
    env = _clean_env()

    found = _run([python, "-c", "import pipeline, transforms; print(pipeline.__file__); print(transforms.__file__)"],
                 cwd=elsewhere, env=env)
    assert found.stdout.split() == [str(REPO / "pipeline" / "__init__.py"), str(REPO / "transforms" / "__init__.py")]
    # MONAI's own check of metadata.json's network_data_format (spatial_shape) on the network training builds
    # (inference.yaml's is built from a model file: tests/bundle/test_zoo.py)
    verified = _run([python, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
                     CONFIGS / "metadata.json", "--config_file", CONFIGS / "train.yaml"], cwd=elsewhere, env=env)
    assert "data shape of network is verified with no error" in verified.stdout + verified.stderr
    assert not list(elsewhere.iterdir())


def _tracked_bundle_files() -> set[str]:
    files = {"LICENSE", "eval/schema.json"}
    for folder, patterns in (("configs", ("*.yaml", "*.json", "*.conf")), ("configs/recipes", ("*.yaml",)),
                             ("docs", ("*.md", "*.png", "*.txt"))):
        files |= {f"{folder}/{p.name}" for pattern in patterns for p in (REPO / "bundle" / folder).glob(pattern)}
    return files


def test_wheel_installs_offline_beside_the_installed_torch(tmp_path: Path) -> None:
    """The README's offline install: `python -m pipeline wheelhouse DIR` (here every dependency is installed, so DIR
    holds the project's wheel alone), then pip with no index and no network must find every dependency installed;
    the main job, `configs` and a bundle command then run from the wheel alone, outputs under the working folder."""
    offline = _offline()
    wheels, elsewhere = tmp_path / "wheels", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run([*(offline if builds_offline() else []), sys.executable, "-m", "pipeline", "wheelhouse", wheels], cwd=tmp_path,
         env={**_clean_env(), "PYTHONPATH": str(REPO)})
    built = sorted(p.name for p in wheels.iterdir())
    # every dependency is installed here ([WHEEL] alone), or nearly: a venv's own setuptools 65.5 shadows the base
    # interpreter's, and torch 2.13 requires setuptools>=77.0.3
    assert WHEEL in built and not any(name.startswith("torch-") for name in built), built
    with zipfile.ZipFile(wheels / WHEEL) as whl:
        names = set(whl.namelist())
    packages = {str(p.parent.relative_to(REPO)) for d in ("pipeline", "transforms") for p in (REPO / d).rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names  # every package listed in pyproject.toml
    assert {n.removeprefix("pipeline/bundle/") for n in names if n.startswith("pipeline/bundle/")} == _tracked_bundle_files()

    python = _venv(tmp_path / "venv")
    installed = _run([*offline, python, "-m", "pip", "install", "--no-index", "--find-links", wheels, wheels / WHEEL],
                     cwd=tmp_path, env=_clean_env())
    (line,) = [line for line in installed.stdout.splitlines() if line.startswith("Successfully installed ")]
    # the wheels in the folder and nothing else: pip found every other dependency installed
    assert sorted(line.split()[2:]) == sorted("-".join(name.split("-")[:2]).replace("_", "-") for name in built)
    env = _clean_env()
    probe = ("import importlib.metadata as m, importlib.util as u, pipeline; "
             "print(pipeline.__file__); print(u.find_spec('torch').origin); print(m.version('torch'))")
    where = _run([python, "-c", probe], cwd=elsewhere, env=env).stdout.split()
    assert Path(where[0]).is_relative_to(tmp_path / "venv")
    assert where[1:] == [importlib.util.find_spec("torch").origin, importlib.metadata.version("torch")]  # untouched

    configs = Path(_run([python, "-m", "pipeline", "configs"], cwd=elsewhere, env=env).stdout.strip())
    assert configs == Path(where[0]).parent / "bundle" / "configs" and (configs / "recipes" / "kaggle_2xT4.yaml").is_file()

    tiny = [a for k, v in {**TINY_TRAIN, "epochs": 1}.items() for a in (f"--{k}", json.dumps(v))]
    _run([*offline, python, "-m", "pipeline", "synth", "--out", "data", "--n_train", "4", "--n_test", "1"],
         cwd=elsewhere, env=env)
    job = _run([*offline, python, "-m", "pipeline", "--dataset_dir", "data", *tiny], cwd=elsewhere, env=env)
    assert (elsewhere / "outputs" / "submission.zip").is_file() and (elsewhere / "models" / "model.pt").is_file()
    assert "done in" in job.stdout
    # the bundle's command line on the installed configs; ckpt_dir defaults to ./models as well
    _run([*offline, python, "-m", "monai.bundle", "run", "inference", "--config_file", configs / "inference.yaml",
          "--dataset_dir", "data", "--output_dir", "again", "--sw_batch_size", "2", "--amp", "False"],
         cwd=elsewhere, env=env)
    assert (elsewhere / "again" / "submission.zip").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["again", "data", "models", "outputs"]
