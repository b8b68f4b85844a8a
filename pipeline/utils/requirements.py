"""The oldest version of each runtime dependency, checked when ``pipeline`` is imported.

The check reads the installed packages' metadata (``importlib.metadata``, a few milliseconds; torch is not imported),
so an image whose packages are too old (say a Kaggle image's torch) fails at once with one line naming the package,
the version found and the version needed, instead of deep inside MONAI. ``pyproject.toml`` declares the same lower
bounds (``tests/utils/test_requirements.py`` keeps the two equal); ``requirements.txt`` pins the versions CI tests.

A package with no metadata is not checked here: importing it fails with Python's own message.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

__all__ = ["MINIMUM", "check_installed", "is_older", "outdated", "outdated_message"]

MINIMUM: dict[str, str] = {
    "torch": "2.8",  # MONAI 1.6.1 requires torch>=2.8.0
    "monai": "1.6.1",  # 1.5.1 lacks SupervisedTrainer's gradient accumulation (pipeline.training.engine)
    "pytorch-ignite": "0.5.5",
    "numpy": "1.26",
    "tifffile": "2024.1.30",
    "zarr": "3.1.6",
    "imagecodecs": "2024.1.1",
    "nibabel": "5.2",
    "scipy": "1.11",
    "scikit-image": "0.26.0",
    "connected-components-3d": "3.14",
    "surface-distance": "0.1",
    "numba": "0.60",
    "tensorboard": "2.15",
    "matplotlib": "3.8",
    "tqdm": "4.66",
    "psutil": "5.9",
    "PyYAML": "6.0",
    "fire": "0.6",
}
"""Distribution name -> the oldest version known to work: the version CI tests where ``requirements.txt`` pins one,
else the lower bound of its range; torch's is MONAI's own requirement."""


def _release(version: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``; pre-release and local tags are ignored."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def is_older(version: str, minimum: str) -> bool:
    """Whether release ``version`` is older than ``minimum`` (``"2.6.0+cu124"`` < ``"2.8"``).

    A version with no release number (``"0+unknown"``, ``"0.0.0"``: a source build or an editable install without
    its tags) is not known to be older: it passes.
    """
    have, need = _release(version), _release(minimum)
    if not any(have):
        return False
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) < need + (0,) * (width - len(need))


def outdated() -> dict[str, str]:
    """``{name: installed version}`` of every installed package older than :data:`MINIMUM`."""
    found = {}
    for name, minimum in MINIMUM.items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if is_older(version, minimum):
            found[name] = version
    return found


def outdated_message() -> str | None:
    """One line naming every installed package older than :data:`MINIMUM`, its version and the one needed; None if
    none is."""
    old = outdated()
    if not old:
        return None
    found = ", ".join(f"{name} {version} (needs >={MINIMUM[name]})" for name, version in old.items())
    upgrade = " ".join(f"'{name}>={MINIMUM[name]}'" for name in old)
    return f"vesuvius-bundle needs newer packages: {found}; upgrade: pip install {upgrade}"


def check_installed() -> None:
    """Refuse to run with a package older than :data:`MINIMUM`.

    On the command lines (``python -m pipeline ...``, ``python -m monai.bundle ...``) it prints one ``error:`` line
    and exits with code 1 (the environment, as every command's exit-code rule says); an import from other code gets
    the same line as an ``ImportError``. ``python -m pipeline wheelhouse``, which gathers the newer wheels, is let
    through.

    Raises:
        ImportError: some installed package is too old (the message names each one, its version and the one needed).
        SystemExit: the same, in a command-line process.
    """
    argv = sys.argv or [""]
    if argv[:2] == ["-m", "wheelhouse"]:  # python -m pipeline wheelhouse gathers the newer wheels: let it run
        return
    message = outdated_message()
    if message is None:
        return
    # python -m pipeline[.x]: sys.argv[0] is "-m" while Python imports the package to locate its __main__
    if argv[0] == "-m" or Path(argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py"):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1)
    raise ImportError(message)
