"""Installed as the README says, the packages import and a bundle command runs from outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"


def test_editable_install_works_from_another_directory(tmp_path: Path) -> None:
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the shared packages (torch, monai, pip, setuptools) are reused; only this project is installed, offline, as the
    # requirements' `-e .` does
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True,
                   timeout=120)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "-e", str(REPO)], check=True, timeout=300, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([python, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    found = run("-c", "import pipeline, transforms; print(pipeline.__file__); print(transforms.__file__)")
    assert found.stdout.split() == [str(REPO / "pipeline" / "__init__.py"), str(REPO / "transforms" / "__init__.py")]
    # MONAI's own check of metadata.json's network_data_format (spatial_shape) on the network training builds
    # (inference.yaml's is built from a model file: tests/test_zoo.py)
    verified = run("-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
                   str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "train.yaml"))
    assert "data shape of network is verified with no error" in verified.stdout + verified.stderr
    assert not list(elsewhere.iterdir())
