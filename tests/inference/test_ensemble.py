"""Ensembles at inference: the fused probability is the weighted mean of the models' (a model with itself: the model),
in bundle inference and in streaming ``predict`` block by block; bad ensembles are refused in one line, exit 2,
nothing written."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from monai.networks.nets import UNet
from monai.transforms import NormalizeIntensity

from pipeline.cli.predict import main as predict_main
from pipeline.inference import predict as predict_module
from pipeline.inference.ensemble import EnsembleInferer
from pipeline.inference.inferers import make_inferer
from pipeline.inference.predict import StreamingPredictor
from pipeline.model.networks import build_network
from pipeline.model.plans import POSTPROCESSING_KEYS, load_model_file, make_plans, pack_model
from pipeline.utils.errors import one_line
from transforms.io import read_volume

REPO = Path(__file__).resolve().parents[2]
INFER = REPO / "bundle" / "configs" / "inference.yaml"
SHAPE = (40, 36, 44)
BLOCK = (16, 32, 16)  # smaller than the volume: 3 x 2 x 3 blocks, each fused on its own
# the network and window come from each model file; a freshly initialised network's probabilities sit near 0.5
PLAIN = {"sw_batch_size": 2, "amp": False, "threshold": 0.5, "closing_radius": 0, "plug_holes": False, "overlays": False}


# ---- the fusion itself, in memory and block by block ----


@pytest.fixture(scope="module")
def nets() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = UNet(3, 1, 1, (4, 8, 16), (2, 2), num_res_units=1).eval()
    torch.manual_seed(1)
    b = UNet(3, 1, 1, (2, 4, 8), (2, 2), num_res_units=1).eval()
    return a, b


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=SHAPE).astype(np.uint8)


def _blocks(predictor: StreamingPredictor, src: Path, out: Path) -> list[np.ndarray]:
    """Each block's float32 probabilities, as post-processing gets them, in raster order."""
    seen: list[np.ndarray] = []

    def post(probs: np.ndarray) -> np.ndarray:
        seen.append(probs.copy())
        return (probs >= 0.5).astype(np.uint8)

    predictor.postprocess = post
    predictor.predict(src, out)
    return seen


@pytest.mark.parametrize("tta", [None, (0, 1, 2)])
def test_streaming_fusion_is_the_weighted_mean_block_by_block(nets, volume, tmp_path, tta):
    a, b = nets
    src = tmp_path / "vol.zarr"
    zarr.create_array(src, data=volume, chunks=(16, 16, 16))
    roi_a, roi_b = (32, 32, 32), (24, 24, 24)

    def streaming(network, roi, weights=None) -> StreamingPredictor:
        return StreamingPredictor(network, roi, sw_batch_size=2, tta_axes=tta, weights=weights, block_size=BLOCK,
                                  chunk_size=(16, 16, 16))

    pa = _blocks(streaming(a, roi_a), src, tmp_path / "a.zarr")
    pb = _blocks(streaming(b, roi_b), src, tmp_path / "b.zarr")
    fused = _blocks(streaming([a, b], [roi_a, roi_b], [0.25, 0.75]), src, tmp_path / "ab.zarr")
    itself = _blocks(streaming([a, a], [roi_a, roi_a], [0.5, 0.5]), src, tmp_path / "aa.zarr")
    assert len(fused) == len(predict_module.plan_blocks(SHAPE, BLOCK)) == 18
    for x, y, f, s in zip(pa, pb, fused, itself):
        assert f.dtype == np.float32 and f.shape == x.shape
        np.testing.assert_allclose(f, 0.25 * x + 0.75 * y, rtol=0, atol=1e-6)
        np.testing.assert_allclose(s, x, rtol=0, atol=1e-6)
    assert np.abs(pa[0] - pb[0]).max() > 1e-3  # two different models: the test can tell them apart
    # and block-wise fusion equals the in-memory EnsembleInferer on the whole volume
    x = NormalizeIntensity()(torch.from_numpy(volume).float())[None, None]
    with torch.no_grad():
        inferers = [make_inferer(roi, 2, tta=tta is not None) for roi in (roi_a, roi_b)]
        whole = EnsembleInferer(inferers, [None, b], [0.25, 0.75])(x, a)[0]
    tiled = np.zeros((1, *SHAPE), np.float32)
    for (_, block), p in zip(predict_module.plan_blocks(SHAPE, BLOCK), fused):
        tiled[(slice(None), *block)] = p
    np.testing.assert_allclose(tiled, whole.numpy(), rtol=0, atol=1e-5)


# ---- model files, as training writes them ----


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """a: conftest's model.pt (channels 4-8-16, 32^3 window); b: another network and window (2-4-8, 24^3); and two
    copies of a whose plans disagree with it (normalisation; labels)."""
    folder = tmp_path_factory.mktemp("ensemble_models")
    torch.manual_seed(1)
    net = build_network("unet", [2, 4, 8], [2, 2], 1, False)
    torch.save(pack_model(net.state_dict(), make_plans(net, [24, 24, 24])), folder / "b.pt")
    state, plans = load_model_file(tiny_model_dir / "model.pt")
    minmax = {**plans, "normalization": {"method": "minmax", "description": "scaled to [0, 1]"}}
    torch.save(pack_model(state, minmax), folder / "minmax.pt")
    ink = {**plans, "labels": {"0": "background", "1": "ink", "2": "unlabeled"}}
    torch.save(pack_model(state, ink), folder / "ink.pt")
    return {"a": tiny_model_dir / "model.pt", "b": folder / "b.pt", "minmax": folder / "minmax.pt", "ink": folder / "ink.pt"}


# ---- bundle inference (inference.yaml) ----


def _bundle(tiny_dataset, out: Path, monkeypatch, **overrides) -> list[np.ndarray]:
    """Run inference.yaml in this process; the probabilities each test volume's post-processing receives."""
    from monai.bundle import run

    from transforms import postprocess

    seen: list[np.ndarray] = []
    real = postprocess.build_postprocessing

    def build(**kwargs):
        chain = real(**kwargs)

        def capture(data):
            seen.append(np.asarray(data["pred"].detach().cpu(), dtype=np.float32).copy())
            return chain(data)

        return capture

    monkeypatch.setattr(postprocess, "build_postprocessing", build)
    common = {**PLAIN, "dataset_dir": str(tiny_dataset), "output_dir": str(out)}
    run("inference", config_file=str(INFER), **{**common, **overrides})
    assert (out / "submission.zip").is_file() and len(seen) == 2
    return seen


def test_bundle_fusion_is_the_weighted_mean(models, tiny_dataset, tmp_path, monkeypatch):
    a, b = str(models["a"]), str(models["b"])
    pa = _bundle(tiny_dataset, tmp_path / "a", monkeypatch, model_path=a)
    pb = _bundle(tiny_dataset, tmp_path / "b", monkeypatch, model_path=b)
    itself = _bundle(tiny_dataset, tmp_path / "aa", monkeypatch, model_path=[a, a])
    # an ensemble file in another folder: paths relative to it, weights normalised (1:3 = 0.25, 0.75)
    folder = tmp_path / "ens"
    folder.mkdir()
    rel = os.path.relpath(b, folder)
    (folder / "ensemble.json").write_text(json.dumps({"models": [a, rel], "weights": [1, 3]}))
    fused = _bundle(tiny_dataset, tmp_path / "ab", monkeypatch, model_path=str(folder / "ensemble.json"))
    for x, y, s, f in zip(pa, pb, itself, fused):
        assert np.abs(x - y).max() > 1e-3
        np.testing.assert_allclose(s, x, rtol=0, atol=1e-6)
        np.testing.assert_allclose(f, 0.25 * x + 0.75 * y, rtol=0, atol=1e-6)
    # model_weights wins over the file's weights
    swapped = _bundle(tiny_dataset, tmp_path / "ba", monkeypatch, model_path=str(folder / "ensemble.json"),
                      model_weights=[3, 1])
    for x, y, f in zip(pa, pb, swapped):
        np.testing.assert_allclose(f, 0.75 * x + 0.25 * y, rtol=0, atol=1e-6)
    # --num_parts: each part predicts its share with the whole ensemble; together the masks of one part
    from monai.bundle import run

    whole = {p.name: read_volume(p) for p in (tmp_path / "ab" / "predictions").glob("*.tif")}
    parts = {}
    for part in (0, 1):
        out = tmp_path / f"part{part}"
        run("inference", config_file=str(INFER), **{**PLAIN, "dataset_dir": str(tiny_dataset), "output_dir": str(out),
                                                    "model_path": str(folder / "ensemble.json"), "num_parts": 2,
                                                    "part_id": part})
        parts.update({p.name: read_volume(p) for p in (out / "predictions").glob("*.tif")})
    assert whole.keys() == parts.keys() and len(whole) == 2
    assert all(np.array_equal(whole[k], parts[k]) for k in whole)


def test_ensemble_postprocessing_file_then_first_model_then_explicit(models, tmp_path):
    from pipeline.model.ensemble import resolve_ensemble

    defaults = {"threshold": 0.6, "hysteresis_low": None, "hysteresis_high": None, "closing_radius": 1,
                "plug_holes": True, "min_size": 0}
    a, b = models["a"], models["b"]
    plain = resolve_ensemble([a, b], defaults=defaults)
    assert plain["postprocessing"] == defaults and [m["weight"] for m in plain["members"]] == [0.5, 0.5]
    assert [m["plans"]["roi_size"] for m in plain["members"]] == [[32, 32, 32], [24, 24, 24]]
    assert plain["network"] == plain["members"][0]["plans"]["network"]
    ens = tmp_path / "ensemble.json"
    ens.write_text(json.dumps({"models": [str(a), str(b)], "postprocessing": {"threshold": 0.4, "min_size": 10}}))
    filed = resolve_ensemble(ens, defaults=defaults)
    assert filed["postprocessing"] == {**defaults, "threshold": 0.4, "min_size": 10}
    given = resolve_ensemble(ens, postprocessing={"threshold": 0.7}, defaults=defaults)
    assert given["postprocessing"]["threshold"] == 0.7 and given["postprocessing"]["min_size"] == 10
    assert resolve_ensemble(a, defaults=defaults) == resolve_ensemble(str(a), [5], defaults=defaults)  # one model


def test_evaluate_and_tune_score_the_fusion_and_tune_writes_the_file_inference_uses(models, tiny_dataset, tmp_path,
                                                                                    capsys):
    """evaluate.yaml on a model with itself scores what the model alone scores; ``tune`` on two models sweeps their
    fused probabilities and writes ``output_dir/ensemble.json`` (models, weights, the best setting), which evaluate
    (and inference: the same ``model_plans``) then use, reproducing the tuned score."""
    from monai.bundle import run

    from pipeline.cli.tune import main as tune_main
    from pipeline.model.ensemble import resolve_ensemble

    configs = [str(REPO / "bundle" / "configs" / c) for c in ("train.yaml", "evaluate.yaml")]
    common = {"dataset_dir": str(tiny_dataset), "amp": False, "sw_batch_size": 2}
    a, b = str(models["a"]), str(models["b"])

    def evaluate(name: str, **keys) -> dict:
        run("evaluating", config_file=configs, **common, output_dir=str(tmp_path / name), **keys)
        return json.loads((tmp_path / name / "metrics.json").read_text())

    alone, itself = evaluate("a", model_path=a), evaluate("aa", model_path=[a, a])
    assert itself["volumes"] == alone["volumes"] and itself["mean"] == alone["mean"]
    assert itself["settings"]["model_path"] == [a, a] and itself["settings"]["model_weights"] == [0.5, 0.5]

    out = tmp_path / "tune"
    grid = ["--grid_threshold", "0.45,0.5,0.55", "--grid_hysteresis_high", "none", "--grid_closing_radius", "0",
            "--grid_plug_holes", "false", "--grid_min_size", "0,50"]
    keys = [f"--{k}={v}" for k, v in common.items()]
    assert tune_main([*keys, "--output_dir", str(out), "--model_path", repr([a, b]), "--model_weights", "[1, 3]",
                      *grid]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "tuning.json").read_text())
    best = report["best"]
    assert report["model_path"] == [a, b]
    spec = json.loads((out / "ensemble.json").read_text())
    assert spec["models"] == [a, b] and spec["weights"] == [0.25, 0.75]  # absolute: not under the file's folder
    assert spec["postprocessing"] == {k: best[k] for k in POSTPROCESSING_KEYS}
    assert spec["tuning"]["score"] == best["score"]
    assert f"predict with --model_path {out / 'ensemble.json'}" in printed
    assert load_model_file(models["a"])[1].get("tuning") is None  # the models themselves are left as they are
    plans = resolve_ensemble(out / "ensemble.json", defaults=dict.fromkeys(POSTPROCESSING_KEYS))
    assert plans["postprocessing"] == spec["postprocessing"]
    scored = evaluate("tuned", model_path=str(out / "ensemble.json"))
    assert scored["mean"]["score"] == pytest.approx(best["score"], abs=1e-9)
    assert {k: scored["settings"][k] for k in POSTPROCESSING_KEYS} == spec["postprocessing"]


def _bad_cases(models: dict[str, Path], tmp_path: Path) -> list[tuple[dict, list[str]]]:
    """(settings, what the one line names) for each bad ensemble."""
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"models": [str(models["a"]), "gone.pt"]}))
    a, b = str(models["a"]), str(models["b"])
    return [
        ({"model_path": str(missing)}, [str(missing), "gone.pt", "not found"]),
        ({"model_path": [a, b], "model_weights": [1.0]}, ["model_weights", "1 weight(s) for 2 model(s)"]),
        ({"model_path": [a, b], "model_weights": [-0.5, 1.5]}, ["model_weights", "-0.5", "negative"]),
        ({"model_path": [a, str(models["minmax"])]}, [a, str(models["minmax"]), "normalization"]),
        ({"model_path": [a, str(models["ink"])]}, [a, str(models["ink"]), "labels"]),
    ]


def test_bundle_bad_ensembles_one_line_nothing_written(models, tiny_dataset, tmp_path):
    from monai.bundle import run

    for i, (settings, needles) in enumerate(_bad_cases(models, tmp_path)):
        out = tmp_path / f"out{i}"
        with pytest.raises(Exception) as info:
            run("inference", config_file=str(INFER), **{**PLAIN, "dataset_dir": str(tiny_dataset), "output_dir": str(out),
                                                        **settings})
        line, code, expected = one_line(info.value)  # what python -m monai.bundle prints last, and its exit code
        assert code == 2 and expected and "\n" not in line and line.startswith("error: "), line
        for needle in needles:
            assert needle in line, line
        assert not (out / "predictions").exists() and not (out / "submission.zip").exists()


def test_bundle_command_line_takes_a_list(models, tiny_dataset, tmp_path):
    """The monai.bundle command line: --model_path "['A.pt','B.pt']"; a bad weight: one last line, exit 2."""
    a, b = models["a"], models["b"]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(INFER),
           "--dataset_dir", str(tiny_dataset), "--output_dir", str(tmp_path / "out"),
           "--model_path", f"['{a}','{b}']", "--model_weights", "[1, -1]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: model_weights: weight -1.0"), proc.stderr[-3000:]
    assert "negative" in last
    assert not (tmp_path / "out" / "predictions").exists()


# ---- streaming predict's command line ----


def _predict(capsys, *args: str) -> tuple[int, str]:
    root = logging.getLogger()
    saved, root.handlers = root.handlers, []
    capsys.readouterr()
    try:
        rc = predict_main(["--sw_batch_size", "2", "--amp", "False", "--threshold", "0.5", "--closing_radius", "0",
                           "--plug_holes", "False", "--block_size", "16", "--chunk_size", "16", "--probabilities",
                           "float16", *args])
    finally:
        root.handlers = saved
    return rc, capsys.readouterr().err.strip()


def test_predict_ensemble_weighted_mean_parts_and_bad_input(models, volume, tmp_path, capsys):
    src = tmp_path / "vol.zarr"
    zarr.create_array(src, data=volume, chunks=(16, 16, 16))
    a, b = str(models["a"]), str(models["b"])

    def probs(name: str, *extra: str) -> np.ndarray:
        rc, err = _predict(capsys, "--input", str(src), "--output", str(tmp_path / name), *extra)
        assert rc == 0, err
        return zarr.open_group(tmp_path / name, mode="r")["probability"][:].astype(np.float32)

    pa = probs("a.zarr", "--model_path", a)
    pb = probs("b.zarr", "--model_path", b)
    np.testing.assert_allclose(probs("aa.zarr", "--model_path", a, a), pa, rtol=0, atol=1e-3)  # float16 storage
    fused = probs("ab.zarr", "--model_path", a, b, "--model_weights", "[0.25, 0.75]")
    np.testing.assert_allclose(fused, 0.25 * pa + 0.75 * pb, rtol=0, atol=2e-3)
    manifest = json.loads((tmp_path / "ab.zarr" / "predict_manifest.json").read_text())
    assert manifest["settings"]["weights"] == [0.25, 0.75] and manifest["settings"]["roi_size"] == [[32] * 3, [24] * 3]
    # --num_parts: two parts into one output equal one part
    for part in ("0", "1"):
        probs("parts.zarr", "--model_path", a, b, "--model_weights", "[0.25, 0.75]", "--num_parts", "2", "--part_id", part)
    one, two = zarr.open_group(tmp_path / "ab.zarr", mode="r"), zarr.open_group(tmp_path / "parts.zarr", mode="r")
    for name in ("mask", "probability"):
        assert np.array_equal(one[name][:], two[name][:])
    # the same ensemble with other weights is another run: refused on that output, which is left as it is
    rc, err = _predict(capsys, "--input", str(src), "--output", str(tmp_path / "ab.zarr"), "--model_path", a, b)
    assert rc == 2 and "another model" in err.splitlines()[-1], err
    for i, (settings, needles) in enumerate(_bad_cases(models, tmp_path)):
        paths = settings["model_path"] if isinstance(settings["model_path"], list) else [settings["model_path"]]
        extra = ["--model_weights", json.dumps(settings["model_weights"])] if "model_weights" in settings else []
        out = tmp_path / f"bad{i}.zarr"
        rc, err = _predict(capsys, "--input", str(src), "--output", str(out), "--model_path", *paths, *extra)
        last = err.splitlines()[-1]
        assert rc == 2 and last.startswith("error: ") and "Traceback" not in err, err
        for needle in needles:
            assert needle in last, err
        assert not out.exists()
