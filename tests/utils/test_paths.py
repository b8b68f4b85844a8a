"""Where outputs and the model go: beside a writable checkout, else under the working directory; a read-only
checkout's own model.pt is found by inference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.utils import paths


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    bundle = tmp_path / "repo" / "bundle"
    (bundle / "configs").mkdir(parents=True)
    return bundle


def _read_only(monkeypatch, root: Path) -> None:
    """As a read-only mount would (root passes os.access on any folder of a writable file system)."""
    real = os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False if mode == os.W_OK and str(Path(p)).startswith(str(root)) else real(p, mode))


def test_writable_checkout_keeps_outputs_beside_it(checkout, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.output_root(checkout) == str(checkout.parent)
    assert paths.models_dir(checkout) == str(checkout / "models")
    assert paths.model_file(paths.models_dir(checkout), checkout) == str(checkout / "models" / "model.pt")


def test_read_only_checkout_writes_under_the_working_directory(checkout, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _read_only(monkeypatch, checkout.parent)
    assert paths.output_root(checkout) == str(work)
    assert paths.models_dir(checkout) == str(work / "models")
    # no model anywhere: the default path, under the working directory (the not-found error names it)
    assert paths.model_file(paths.models_dir(checkout), checkout) == str(work / "models" / "model.pt")
    # the checkout ships its trained model: inference finds it ...
    (checkout / "models").mkdir()
    (checkout / "models" / "model.pt").write_bytes(b"x")
    assert paths.model_file(paths.models_dir(checkout), checkout) == str(checkout / "models" / "model.pt")
    # ... until training here writes its own, or --ckpt_dir names another folder
    (work / "models").mkdir()
    (work / "models" / "model.pt").write_bytes(b"y")
    assert paths.model_file(paths.models_dir(checkout), checkout) == str(work / "models" / "model.pt")
    other = tmp_path / "other"
    assert paths.model_file(other, checkout) == str(other / "model.pt")


def test_inference_config_uses_the_read_only_checkouts_model(checkout, tmp_path, monkeypatch):
    from pipeline.utils.config import load_config

    repo_configs = Path(paths.BUNDLE) / "configs"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (checkout / "models").mkdir()
    (checkout / "models" / "model.pt").write_bytes(b"x")
    _read_only(monkeypatch, checkout.parent)
    parser = load_config(repo_configs / "inference.yaml", overrides={"bundle_root": str(checkout)})
    assert parser.get_parsed_content("model_path") == str(checkout / "models" / "model.pt")
    assert parser.get_parsed_content("output_dir") == str(work / "outputs")
