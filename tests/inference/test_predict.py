"""Streaming block-wise prediction: equal to whole-volume inference, resumable, every input kind, bad inputs."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from monai.networks.nets import UNet
from monai.transforms import NormalizeIntensity

from pipeline.cli.predict import main
from pipeline.inference import predict as predict_module
from pipeline.inference.blockwise import BlockwiseSlidingWindow, WindowCache
from pipeline.inference.inferers import make_inferer
from pipeline.inference.predict import PredictError, StreamingPredictor, volume_stats
from tests.conftest import TINY_INFER

ROI = (32, 32, 32)
SHAPE = (40, 36, 44)


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(3, 1, 1, (4, 8, 16), (2, 2), num_res_units=1).eval()


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=SHAPE).astype(np.uint8)


def _whole(net: torch.nn.Module, vol: np.ndarray, tta: bool = False, overlap: float = 0.5) -> np.ndarray:
    """What inference.yaml computes in memory: NormalizeIntensity, then make_inferer's probabilities."""
    x = NormalizeIntensity()(torch.from_numpy(vol).float())
    with torch.no_grad():
        return make_inferer(ROI, 2, overlap, tta=tta)(x[None, None], net)[0].numpy()


def _blockwise(sw: BlockwiseSlidingWindow, x: np.ndarray, block: int) -> np.ndarray:
    out = None
    for z in range(0, x.shape[0], block):
        for y in range(0, x.shape[1], block):
            for w in range(0, x.shape[2], block):
                region = tuple(slice(a, min(a + block, s)) for a, s in zip((z, y, w), x.shape))
                probs = sw.predict(lambda r: x[r], x.shape, region)
                out = np.zeros((probs.shape[0], *x.shape), np.float32) if out is None else out
                out[(slice(None), *region)] = probs
    return out


@pytest.mark.parametrize(
    ("shape", "tta", "block", "overlap"),
    [(SHAPE, False, 16, 0.5), ((40, 20, 44), True, 24, 0.5), ((33, 41, 38), False, 13, 0.7)],
)
def test_blockwise_equals_whole_volume(net, shape, tta, block, overlap):
    vol = np.random.default_rng(1).integers(0, 256, size=shape).astype(np.uint8)  # (40, 20, 44): padded on Y
    ref = _whole(net, vol, tta, overlap)
    x = NormalizeIntensity()(torch.from_numpy(vol).float()).numpy()
    sw = BlockwiseSlidingWindow(net, ROI, overlap, 2, tta_axes=(0, 1, 2) if tta else None, cache_bytes=0)
    assert np.abs(_blockwise(sw, x, block) - ref).max() <= 1e-5


def test_window_cache_runs_each_window_once(net, volume):
    x = NormalizeIntensity()(torch.from_numpy(volume).float()).numpy()
    cached = BlockwiseSlidingWindow(net, ROI, 0.5, 2)
    uncached = BlockwiseSlidingWindow(net, ROI, 0.5, 2, cache_bytes=0)
    # windows run in full (padded) batches and are summed in grid order: bit-equal whatever was cached
    assert np.array_equal(_blockwise(cached, x, 16), _blockwise(uncached, x, 16))
    assert cached.windows_run == 8 < uncached.windows_run  # 2 x 2 x 2 windows on 40 x 36 x 44


def test_window_cache_slab_lru_and_pins():
    cache = WindowCache(3 * 4 * 8)  # three windows of (1, 2, 2, 2) float32
    outs = {k: torch.full((1, 2, 2, 2), float(k)) for k in range(5)}
    assert all(cache.put((k,), outs[k]) for k in range(3)) and cache.capacity == 3 and cache.nbytes == 96
    cache.get((0,))  # most recently used: 1 is evicted next
    assert cache.put((3,), outs[3]) and (1,) not in cache and len(cache) == 3
    cache.pin({(0,), (2,), (3,)})
    assert not cache.put((4,), outs[4]) and (4,) not in cache  # every slot pinned: not kept, nothing evicted
    cache.drop((2,))
    assert cache.put((4,), outs[4]) and torch.equal(cache.get((4,)), outs[4]) and torch.equal(cache.get((0,)), outs[0])
    # every output lives in the one slab: no tensor per window for the allocator to fragment
    assert len({cache.get(k).untyped_storage().data_ptr() for k in [(0,), (3,), (4,)]}) == 1
    assert cache.nbytes <= cache.budget and cache.allocated_bytes == 96
    assert not WindowCache(10).put((0,), outs[0]) and WindowCache(10).allocated_bytes == 0  # below one window: nothing
    small = WindowCache(3 * 32)
    small.SLAB_BYTES = 64  # two slots a slab: the slabs grow with the slots used, never past the budget
    assert small.put((0,), outs[0]) and small.allocated_bytes == 64
    assert all(small.put((k,), outs[k]) for k in range(1, 5)) and small.allocated_bytes == 96
    assert [k for k in small] == [(2,), (3,), (4,)] and all(torch.equal(small.get((k,)), outs[k]) for k in (2, 3, 4))


def test_window_cache_holds_only_what_later_blocks_need(volume):
    """The window outputs held stay within the byte budget, live in the slab, and are all let go by the volume's
    end (each is dropped once the last block that needs it used it); the result is bit-equal to no cache."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 1, 3, padding=1).eval()
    x = NormalizeIntensity()(torch.from_numpy(volume).float()).numpy()
    roi, block = (8, 8, 8), 16
    budget = 40 * 8**3 * 4  # 40 windows: fewer than the run reuses, so eviction happens too
    sw = BlockwiseSlidingWindow(conv, roi, 0.5, 3, cache_bytes=budget)
    held = []
    predict = sw.predict

    def watched(*args, **kwargs):
        out = predict(*args, **kwargs)
        held.append(len(sw.cache))
        assert sw.cache.nbytes <= sw.cache.allocated_bytes <= budget
        assert len({sw.cache.get(k).untyped_storage().data_ptr() for k in sw.cache}) <= 1
        return out

    sw.predict = watched
    uncached = BlockwiseSlidingWindow(conv, roi, 0.5, 3, cache_bytes=0)
    assert np.array_equal(_blockwise(sw, x, block), _blockwise(uncached, x, block))
    assert max(held) == 40 and held[-1] == 0
    assert sw.windows_run < uncached.windows_run


def test_stats_exact(volume):
    src = predict_module.VolumeSource(Path("mem"), volume)
    mean, std = volume_stats(src, (16, 16, 16))
    assert mean == pytest.approx(volume.astype(np.float64).mean(), abs=1e-9)
    assert std == pytest.approx(volume.astype(np.float64).std(), abs=1e-9)


def _predictor(net, capture: dict | None = None, **kwargs) -> StreamingPredictor:
    def post(probs: np.ndarray) -> np.ndarray:
        if capture is not None:
            capture.setdefault("probs", []).append(probs)
        return (probs >= 0.5).astype(np.uint8)

    return StreamingPredictor(net, ROI, sw_batch_size=2, postprocess=post, block_size=(16, 32, 16), chunk_size=(16, 16, 16), **kwargs)


def test_streaming_equals_in_memory(net, volume, tmp_path):
    src = tmp_path / "vol.zarr"
    zarr.create_array(src, data=volume, chunks=(16, 16, 16), zarr_format=2)
    capture: dict = {}
    predictor = _predictor(net, capture, probabilities="float16")
    predictor.predict(src, tmp_path / "out.zarr")
    ref = _whole(net, volume)[0]
    out = zarr.open_group(tmp_path / "out.zarr", mode="r")
    # the blocks' float32 probabilities, in raster order, tile the volume
    probs = np.zeros(SHAPE, np.float32)
    for (_, block), p in zip(predict_module.plan_blocks(SHAPE, (16, 32, 16)), capture["probs"]):
        probs[block] = p[0]
    assert np.abs(probs - ref).max() <= 1e-5
    assert np.abs(out["probability"][:].astype(np.float32) - ref).max() <= 1e-3  # float16 storage
    near = np.abs(ref - 0.5) < 1e-5
    assert np.array_equal(out["mask"][:][~near], (ref >= 0.5)[~near]) and 0 < out["mask"][:].mean() < 1
    assert out["mask"].chunks == (16, 16, 16) and out["mask"].dtype == np.uint8


def test_kill_and_rerun_equals_uninterrupted(net, volume, tmp_path, monkeypatch):
    src = tmp_path / "vol.zarr"
    zarr.create_array(src, data=volume, chunks=(16, 16, 16))
    _predictor(net, probabilities="uint8").predict(src, tmp_path / "full.zarr")
    record = StreamingPredictor._record
    calls = {"n": 0}

    def dying(self, records, index, digest):
        if calls["n"] == 3:
            raise KeyboardInterrupt  # a kill after 3 finished blocks (the 4th block's chunks are written, unrecorded)
        calls["n"] += 1
        record(self, records, index, digest)

    monkeypatch.setattr(StreamingPredictor, "_record", dying)
    with pytest.raises(KeyboardInterrupt):
        _predictor(net, probabilities="uint8").predict(src, tmp_path / "resumed.zarr")
    monkeypatch.setattr(StreamingPredictor, "_record", record)
    assert len(list((tmp_path / "resumed.zarr" / ".blocks").glob("*.json"))) == 3
    again = _predictor(net, probabilities="uint8")
    ran, block_predict = [], again.window.predict
    again.window.predict = lambda *a: ran.append(a[2]) or block_predict(*a)
    again.predict(src, tmp_path / "resumed.zarr")
    n_blocks = len(predict_module.plan_blocks(SHAPE, (16, 32, 16)))
    assert len(ran) == n_blocks - 3  # the recorded blocks were skipped, the unrecorded 4th was redone
    a, b = zarr.open_group(tmp_path / "full.zarr", mode="r"), zarr.open_group(tmp_path / "resumed.zarr", mode="r")
    for name in ("mask", "probability"):
        assert np.array_equal(a[name][:], b[name][:])
    assert len(list((tmp_path / "resumed.zarr" / ".blocks").glob("*.json"))) == n_blocks


def test_parts_cover_the_volume(net, volume, tmp_path):
    src = tmp_path / "vol.tif"
    tifffile.imwrite(src, volume, compression="zlib")
    whole = _predictor(net, probabilities="uint8")
    whole.predict(src, tmp_path / "whole.zarr")
    for part in (0, 1):
        _predictor(net, probabilities="uint8").predict(src, tmp_path / "parts.zarr", num_parts=2, part_id=part)
    a, b = zarr.open_group(tmp_path / "whole.zarr", mode="r"), zarr.open_group(tmp_path / "parts.zarr", mode="r")
    assert np.array_equal(a["probability"][:], b["probability"][:]) and np.array_equal(a["mask"][:], b["mask"][:])


# ---- the command line: every input kind, and each bad input gives one line naming the path ----


@pytest.fixture(scope="module")
def cli(tiny_model_dir):
    overrides = {k: v for k, v in TINY_INFER.items() if k != "amp"}
    args = [f"--{k}={json.dumps(v)}" for k, v in overrides.items()]
    args += ["--model_path", str(tiny_model_dir / "model.pt"), "--threshold", "0.5", "--closing_radius", "0",
             "--plug_holes", "False", "--block_size", "32", "--chunk_size", "16"]

    def run(capsys, *extra: str) -> tuple[int, str]:
        # the CLI sets up console logging when the root logger has none: give it a clean root, then restore it
        root = logging.getLogger()
        saved, root.handlers = root.handlers, []
        capsys.readouterr()
        try:
            rc = main([*args, *extra])  # extra last: it wins over the defaults above
        finally:
            root.handlers = saved
        return rc, capsys.readouterr().err.strip()

    return run


def test_cli_inputs_v3_ome_tiff_folder(cli, capsys, volume, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    zarr.create_array(folder / "a.zarr", data=volume, chunks=(16, 16, 16), zarr_format=3)
    tifffile.imwrite(folder / "b.tif", volume, compression="lzw")
    ome = zarr.open_group(tmp_path / "c.ome.zarr", mode="w")
    ome.create_array("0", data=volume[None, None], chunks=(1, 1, 16, 16, 16))
    ome.create_array("1", data=volume[None, None, ::2, ::2, ::2])
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [{"name": n, "type": "space"} for n in "zyx"]
    ome.attrs["multiscales"] = [{"axes": axes, "datasets": [{"path": "0"}, {"path": "1"}]}]
    rc, err = cli(capsys, "--input", str(folder), "--output", str(tmp_path / "out"))
    assert rc == 0, err
    rc, err = cli(capsys, "--input", str(tmp_path / "c.ome.zarr"), "--output", str(tmp_path / "c_mask.zarr"))
    assert rc == 0, err
    masks = [zarr.open_group(p, mode="r")["mask"][:] for p in (tmp_path / "out/a.zarr", tmp_path / "out/b.zarr", tmp_path / "c_mask.zarr")]
    assert masks[0].shape == SHAPE and 0 < masks[0].mean() < 1
    assert all(np.array_equal(masks[0], m) for m in masks[1:])


def _bad(cli, capsys, inp: Path, out: Path, *needles: str) -> None:
    rc, err = cli(capsys, "--input", str(inp), "--output", str(out))
    last = err.splitlines()[-1]  # progress lines may come first; the problem is one line, and no traceback
    assert rc == 2 and last.startswith("error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in last, err


def test_cli_bad_inputs(cli, capsys, volume, tmp_path, monkeypatch):
    out = tmp_path / "out.zarr"
    group = zarr.open_group(tmp_path / "group.zarr", mode="w")
    group.create_array("raw", data=volume)
    _bad(cli, capsys, tmp_path / "group.zarr", out, "group.zarr", "not an array", "raw")
    zarr.create_array(tmp_path / "flat.zarr", data=volume[0])
    _bad(cli, capsys, tmp_path / "flat.zarr", out, "flat.zarr", "2D")
    zarr.create_array(tmp_path / "four.zarr", data=volume[None].repeat(2, 0))
    _bad(cli, capsys, tmp_path / "four.zarr", out, "four.zarr", "4D")
    zarr.create_array(tmp_path / "float.zarr", data=volume.astype(np.float32))
    _bad(cli, capsys, tmp_path / "float.zarr", out, "float.zarr", "float32", "uint8")
    _bad(cli, capsys, tmp_path / "missing.zarr", out, "missing.zarr", "not found")
    assert not out.exists()
    # an output holding another volume's blocks, then another model's
    zarr.create_array(tmp_path / "small.zarr", data=volume[:32])
    zarr.create_array(tmp_path / "big.zarr", data=volume)
    rc, err = cli(capsys, "--input", str(tmp_path / "small.zarr"), "--output", str(out))
    assert rc == 0, err
    before = zarr.open_group(out, mode="r")["mask"][:]
    _bad(cli, capsys, tmp_path / "big.zarr", out, str(out), "another volume", "shape")
    rc, err = cli(capsys, "--input", str(tmp_path / "small.zarr"), "--output", str(out), "--network_channels", "[4, 8, 8]",
                  "--model_path", str(_other_model(tmp_path)))
    assert rc == 2 and "another model" in err and str(out) in err, err
    assert np.array_equal(zarr.open_group(out, mode="r")["mask"][:], before)  # nothing mixed in
    # a full disk mid-write
    real = zarr.Array.__setitem__

    def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr.Array, "__setitem__", full)
    _bad(cli, capsys, tmp_path / "big.zarr", tmp_path / "full.zarr", "full.zarr", "disk full", "rerun")
    monkeypatch.setattr(zarr.Array, "__setitem__", real)


def _other_model(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    path = tmp_path / "other.pt"
    torch.save(UNet(3, 1, 1, (4, 8, 8), (2, 2), num_res_units=1).state_dict(), path)
    return path


def test_bad_settings_are_refused(net):
    with pytest.raises(PredictError, match="multiple of chunk_size"):
        StreamingPredictor(net, ROI, block_size=(24, 32, 32), chunk_size=(16, 16, 16))


def test_corrupt_chunk_names_the_volume(cli, capsys, volume, tmp_path):
    src = tmp_path / "broken.zarr"
    zarr.create_array(src, data=volume, chunks=(16, 16, 16), zarr_format=2)
    (src / "1.1.1").write_bytes(b"not a compressed chunk")
    _bad(cli, capsys, src, tmp_path / "out.zarr", "broken.zarr", "cannot read region")
