"""``python -m pipeline wheelhouse DIR``: the wheels this environment lacks to install the project offline.

Run it from a checkout, with the network on, in the environment the offline install will go to (on Kaggle: a
notebook with internet on, same image). It builds the project's wheel into ``DIR``, asks pip what installing that
wheel would add here (``pip install --dry-run --report``: what is installed and recent enough, torch among them,
stays out) and puts those wheels into ``DIR`` too (``pip wheel --no-deps``: an sdist-only package is built once, so
the offline install needs no build step). Upload ``DIR`` (a Kaggle dataset); offline::

    pip install --no-index --find-links DIR vesuvius-bundle

pip reads its usual configuration (index URL, proxy), so ``--index-url`` or ``PIP_INDEX_URL`` point it elsewhere.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from pipeline.utils.errors import PipelineError
from pipeline.utils.paths import BUNDLE, INSTALLED_BUNDLE, PACKAGES_DIR
from pipeline.utils.requirements import is_older

__all__ = ["PipError", "build_wheel", "builds_offline", "main", "missing_packages"]

PROJECT = "vesuvius-bundle"
_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "pipeline", "transforms", "bundle")


class PipError(PipelineError):
    """pip failed (no network, no index, a package with no wheel for this platform): its last line, exit code 1."""

    exit_code = 1  # the environment, not the input


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        msg = f"pip {args[0]} failed (exit code {proc.returncode}): {last}"
        raise PipError(msg)


def builds_offline() -> bool:
    """Whether the installed setuptools builds the project's wheel with no download (``pip --no-build-isolation``):
    70.1 or later, or 64 or later with the ``wheel`` package (``bdist_wheel`` moved into setuptools in 70.1). Else
    pip fetches a build backend from the index (an isolated build).
    """
    try:
        setuptools = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        return False
    if not is_older(setuptools, "70.1"):
        return True
    try:
        return not is_older(setuptools, "64") and bool(metadata.version("wheel"))
    except metadata.PackageNotFoundError:
        return False


def build_wheel(out: Path) -> Path:
    """Build the project's wheel from this checkout into ``out``, from a copy (no ``build/`` left in the checkout).

    Raises:
        PipelineError: the packages are an installed wheel, not a checkout (the source is not here).
    """
    if BUNDLE == INSTALLED_BUNDLE or not (PACKAGES_DIR / "pyproject.toml").is_file():
        msg = (f"{PACKAGES_DIR}: not a checkout of the project (an installed wheel); run wheelhouse from the "
               "repository, or copy the project's wheel into the folder yourself")
        raise PipelineError(msg)
    with tempfile.TemporaryDirectory() as tmp:
        source, dist = Path(tmp) / "src", Path(tmp) / "dist"
        source.mkdir()
        for name in _SOURCES:
            path = PACKAGES_DIR / name
            if path.is_dir():  # never models/ (checkpoints) or caches
                shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "models", "*.pt"))
            else:
                shutil.copy2(path, source / name)
        _pip("wheel", "--quiet", "--no-deps", *(["--no-build-isolation"] if builds_offline() else []), "-w", str(dist),
             str(source))
        (built,) = dist.glob("*.whl")
        return Path(shutil.copy2(built, out / built.name))


def missing_packages(wheel: Path, find_links: Path) -> list[str]:
    """``name==version`` of every package pip would install next to what is installed here, for ``wheel``."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        _pip("install", "--quiet", "--dry-run", "--report", str(report), "--find-links", str(find_links), str(wheel))
        install = json.loads(report.read_text())["install"]
    pins = [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in install]
    return [pin for pin in pins if pin.split("==")[0].lower().replace("_", "-") != PROJECT]


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli.parsers import wheelhouse_parser

    args = wheelhouse_parser().parse_args(argv)
    out = Path(args.dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    wheel = build_wheel(out)
    print(f"built {wheel.name}", flush=True)
    pins = missing_packages(wheel, out)
    if pins:
        print(f"fetching {len(pins)} wheel(s) this environment lacks: {' '.join(pins)}", flush=True)
        _pip("wheel", "--quiet", "--no-deps", "-w", str(out), *pins)
    else:
        print("every dependency is installed here: the project's wheel is all an offline install needs")
    print(f"{out}\noffline: pip install --no-index --find-links {out} {PROJECT}")
    return 0
