"""The dependency ranges: pyproject.toml declares the bounds the import check enforces, and the versions CI tests
fall inside them; a too-old package ends in one line naming it and the version needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.utils import requirements
from pipeline.utils.requirements import MINIMUM, check_installed, is_older

REPO = Path(__file__).resolve().parents[2]


def _declared() -> list[Requirement]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]


def test_pyproject_declares_the_checked_lower_bounds() -> None:
    lower = {}
    for req in _declared():
        (bound,) = [s.version for s in req.specifier if s.operator == ">="]
        lower[canonicalize_name(req.name)] = bound
    assert lower == {canonicalize_name(k): v for k, v in MINIMUM.items()}


def test_the_tested_versions_satisfy_the_declared_ranges() -> None:
    meta = json.loads((REPO / "bundle" / "configs" / "metadata.json").read_text())
    tested = {canonicalize_name(k): v for k, v in meta["required_packages_version"].items()}
    tested |= {"torch": meta["pytorch_version"], "monai": meta["monai_version"], "numpy": meta["numpy_version"]}
    for req in _declared():
        assert req.specifier.contains(tested[canonicalize_name(req.name)]), (req, tested[canonicalize_name(req.name)])


@pytest.mark.parametrize(("version", "minimum", "older"), [
    ("2.6.0+cu124", "2.8", True), ("2.8.0", "2.8", False), ("2.13.0+cpu", "2.8", False), ("1.6.0", "1.6.1", True),
    ("2024.12.30", "2024.1.30", False), ("0.60.0rc1", "0.60", False), ("3.0", "3.1.6", True),
    ("0+unknown", "2.8", False), ("0.0.0", "0.60", False), ("dev", "1.0", False),
])
def test_is_older(version: str, minimum: str, older: bool) -> None:
    assert is_older(version, minimum) is older


def test_a_too_old_package_is_named_with_the_version_needed(monkeypatch, capsys) -> None:
    monkeypatch.setitem(MINIMUM, "numpy", "99")
    monkeypatch.setattr(sys, "argv", ["some_script.py"])
    with pytest.raises(ImportError, match=r"numpy \S+ \(needs >=99\).*pip install 'numpy>=99'"):
        check_installed()
    monkeypatch.setattr(sys, "argv", ["-m", "--epochs", "3"])  # python -m pipeline, while the package is imported
    with pytest.raises(SystemExit) as stop:
        check_installed()
    assert stop.value.code == 1  # the environment, as every command's exit-code rule says
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {requirements.outdated_message()}"]


def test_the_command_line_stops_in_one_line_and_wheelhouse_still_runs(tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "numpy-1.0.dist-info"  # metadata found before the real numpy's
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: numpy\nVersion: 1.0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(fake.parent)])}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120, check=False)

    stopped = run("--help")
    assert stopped.returncode == 1 and not stopped.stdout
    line = "error: vesuvius-bundle needs newer packages: numpy 1.0 (needs >=1.26); upgrade: pip install 'numpy>=1.26'"
    assert stopped.stderr.strip().splitlines() == [line]
    assert run("wheelhouse", "--help").returncode == 0  # the command that gathers the newer wheels


def test_the_package_and_the_bundle_have_one_version() -> None:
    """The wheel's version is the bundle's (metadata.json, whose changelog the model zoo checks)."""
    meta = json.loads((REPO / "bundle" / "configs" / "metadata.json").read_text())
    with open(REPO / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["version"] == meta["version"]
