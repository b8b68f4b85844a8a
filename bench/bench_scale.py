"""Real-scale data path: the volume store on N synthetic volumes of 320^3 (default 40).

Prints, measured in this run:

0. the store on disk with skeletons, bytes per voxel: before (format 1: image, label and skeleton as uncompressed
   ``.npy``) and after (label and skeleton packed in one byte, LZ4 chunks, ``pipeline.data.chunked``); the tubed skeleton's CPU
   seconds per volume, before (scikit-image's ``skeletonize`` and binary dilations) and after
   (``pipeline.data.thinning``, checked voxel for voxel against it);
1. loader patches per CPU-second of one thread at 64^3 and 128^3 from 320^3 volumes, train.yaml's crop with the
   augmentation in the loader (CPU training) or on the GPU (CUDA), memory-mapped: before (format 1's files, the
   float32 target cast in the loader) and after (this store and chain);
2. the default ``python -m monai.bundle run training`` for one epoch shortened to ``--iterations`` (the CPUs
   these figures come from are shared) in runs that follow each other: first run (builds the store: its start-up is the build), second run (start-up with the store built),
   the in-RAM vs memory-mapped step, and with ``--mem-cap`` the default settings inside a cgroup-v1 memory cap,
   single process and 2-process gloo DDP; peak memory of each run (cgroup peak incl. page cache, and peak RSS);
3. validation sizing: one validation volume's sliding-window cost against a training step, and the share of
   training time that ``val_max_cases`` validation takes at Kaggle scale (646 training / 160 validation volumes).

Validation inside these training runs is cut to one centre window of two volumes (its cost is item 3); the
competition score is off (``bench_score.py`` measures it).

    nice -n 10 python bench/bench_scale.py                    # data generated once into data/bench_scale
    nice -n 10 python bench/bench_scale.py --mem-cap kaggle   # cap = 0.55 x uint8 dataset + 1.1 GiB
    nice -n 10 python bench/bench_scale.py --mem-cap 3000     # cap in MiB

The cap needs root and the cgroup-v1 memory controller at /sys/fs/cgroup/memory (page cache counts there and is
reclaimable); without ``--mem-cap`` runs still go in an uncapped child group to read their peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TRAIN = REPO / "bundle" / "configs" / "train.yaml"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
KAGGLE = {"train": 646, "val": 160, "epochs": 71, "val_interval": 5}


class StepTimer:
    """Bundle handler: writes ``<out>/timer_rank<r>.json`` with start-up time, iteration times and peak memory."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.times: list[float] = []
        self.cpu: list[float] = []  # process CPU time: steadier than wall time on a shared machine
        self.data: list[float] = []  # seconds waiting for each batch
        self.started = 0.0

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.times.append(time.time()))
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.cpu.append(time.process_time()))
        engine.add_event_handler(Events.GET_BATCH_STARTED, lambda e: self.data.append(-time.perf_counter()))
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, lambda e: self.data.__setitem__(-1, self.data[-1] + time.perf_counter()))
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _started(self, engine) -> None:
        self.started = time.time()

    def _write(self, engine) -> None:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        rank = int(os.environ.get("RANK", 0))
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"timer_rank{rank}.json").write_text(json.dumps({
            "process_start": float(os.environ["BENCH_T0"]), "started": self.started, "iterations": self.times, "cpu": self.cpu, "data": self.data,
            "peak_rss_mib": int(status["VmHWM"].split()[0]) / 1024, "rss_anon_mib": int(status["RssAnon"].split()[0]) / 1024,
        }))


def generate(data: Path, n: int) -> None:
    from pipeline.data.synth import SynthConfig, generate_dataset

    if (data / "train.csv").is_file():
        return
    t0 = time.monotonic()
    generate_dataset(data, SynthConfig(n_train=n, n_test=1, shapes=((320, 320, 320),), n_scrolls=4, seed=0))
    print(f"generated {n} volumes of 320^3 in {time.monotonic() - t0:.0f} s into {data}", flush=True)


def dataset_bytes(data: Path) -> int:
    from pipeline.data.datalist import train_datalist
    from transforms.io import read_volume_shape

    return sum(2 * int(__import__("numpy").prod(read_volume_shape(c["image"]))) for c in train_datalist(data))


def _format1(items: list[dict]) -> list[dict]:
    """The same store items with the label and skeleton as uncompressed ``.npy`` files (store format 1), written
    beside the store's chunked files."""
    import numpy as np

    from pipeline.data.chunked import ChunkedVolume
    from pipeline.data.store import LABEL_BITS, SKELETON_SHIFT

    out = []
    for item in items:
        item = dict(item)
        packed = None
        for key, (bits, shift) in (("label", (LABEL_BITS, 0)), ("skeleton", (1, SKELETON_SHIFT))):
            if key in item:
                npy = item["label"].replace(".label.chunks", f".{key}.npy")
                if not Path(npy).is_file():
                    packed = np.asarray(ChunkedVolume(item["label"])) if packed is None else packed
                    np.save(npy, (packed >> shift) & bits)
                item[key] = npy
        out.append(item)
    return out


def loader_rate(data: Path, store_dir: Path, patch: int, visits: int, on_device: bool = False, rounds: int = 5) -> dict:
    """Patches per CPU-second of one thread, memory-mapped, with train.yaml's crop (and, unless ``on_device``, its
    augmentation in the loader; ``on_device`` is CUDA's default: the loader only crops and normalises).

    Compared: ``before`` (format 1, label and skeleton uncompressed ``.npy``, and the target cast to float32 in the
    loader, as 0.4.0 did) and ``after`` (format 2, packed chunked LZ4, and train.yaml's chain now). With
    ``on_device`` also ``format 1, this chain``, which isolates the storage from the uint8 target. Each rate is the
    median of interleaved rounds on the same random draws; ratios are medians of the rounds' ratios.
    """
    import numpy as np
    import torch
    from monai.bundle import ConfigParser
    from monai.transforms import CastToTyped, Compose

    from pipeline.data.datalist import prepare_datalists
    from pipeline.data.store import StoreDataset, build_store

    class Format1(StoreDataset):
        def _open(self, index, mmap_mode):
            item = self.data[index]
            arrays = {k: np.load(item[k], mmap_mode=mmap_mode) for k in ("image", "label", "centres", "skeleton") if k in item}
            bounds = np.cumsum([0, *item["centres_per_class"]])
            arrays["centres"] = [arrays["centres"][bounds[i] : bounds[i + 1]] for i in range(len(item["centres_per_class"]))]
            return arrays

    torch.set_num_threads(1)
    lists = prepare_datalists(data, check=False)
    two = {"train": lists["train"][:2], "val": []}
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update({"patch_size": [patch] * 3, "num_workers": 0, "store_mode": "mmap", "augment_on_device": on_device})
    parser["datalists"] = two
    # the store the config's crop reads: with skeletons when its skeleton recall loss is on (train.yaml's default)
    skeleton = parser.get_parsed_content("skeleton_recall_weight")
    parser["store"] = store = build_store(two, store_dir, skeletons=["train"] if skeleton else [])
    parser.get_parsed_content("imports")
    after = parser.get_parsed_content("train#dataset")
    float_target = Compose([CastToTyped(t.keys, dtype=torch.float32) if isinstance(t, CastToTyped) else t
                            for t in after.transform.transforms])  # the same transform objects: the same draws
    old_items = _format1(store["train"])
    datasets = {"before": Format1(old_items, transform=float_target, mode="mmap"), "after": after}
    if on_device:
        datasets["format 1, this chain"] = Format1(old_items, transform=after.transform, mode="mmap")
    for ds in datasets.values():
        ds[0], ds[1]  # warm: page cache, first-call set-up
    cpu: dict[str, list[float]] = {name: [] for name in datasets}
    per_round = max(2, visits // rounds)
    for r in range(rounds):  # interleaved: a shared machine's drift hits every variant alike
        for name, ds in datasets.items():
            ds.transform.set_random_state(seed=r)  # the same crops and augmentation draws: only files and cast differ
            c0 = time.process_time()
            n = sum(len(ds[i % 2]) for i in range(per_round))
            cpu[name].append(n / (time.process_time() - c0))
    return {name: (statistics.median(rates), statistics.median(a / b for a, b in zip(cpu["after"], rates, strict=True)))
            for name, rates in cpu.items()}


def store_footprint(data: Path, store_dir: Path, n_skeleton: int = 4) -> dict:
    """Bytes per voxel on disk of the store with skeletons: this format (measured files) and format 1 (uncompressed
    ``.npy``: image, label, skeleton, centres); tubed-skeleton seconds per volume (process CPU time, one thread)."""
    import numpy as np
    from scipy import ndimage
    from skimage.morphology import skeletonize

    from pipeline.data.chunked import ChunkedVolume
    from pipeline.data.datalist import prepare_datalists
    from pipeline.data.store import LABEL_BITS, build_store, tubed_skeleton

    lists = prepare_datalists(data, check=False)
    store = build_store({"train": lists["train"] + lists["val"]}, store_dir, skeletons=["train"])["train"]
    voxels = sum(int(np.prod(it["shape"])) for it in store)
    files = [Path(it[k]) for it in store for k in ("image", "label", "centres")]  # the skeleton is in the label file
    after = sum(f.stat().st_size for f in files)
    before = sum(Path(it["image"]).stat().st_size + Path(it["centres"]).stat().st_size + 2 * int(np.prod(it["shape"])) for it in store)
    before_s, after_s = [], []
    cross = ndimage.generate_binary_structure(3, 1)
    for it in store[:n_skeleton]:
        label = np.asarray(ChunkedVolume(it["label"])) & LABEL_BITS
        c0 = time.process_time()
        old = ndimage.binary_dilation(skeletonize(label == 1), cross, iterations=2) & (label == 1)  # before: scikit-image
        c1 = time.process_time()
        new = tubed_skeleton(label)
        c2 = time.process_time()
        if not np.array_equal(old, new.astype(bool)):
            raise SystemExit(f"{it['label']}: the tubed skeleton differs from scikit-image's")
        before_s.append(c1 - c0)
        after_s.append(c2 - c1)
    parts = {name: sum(Path(it[key]).stat().st_size for it in store) / voxels
             for name, key in (("image", "image"), ("label + skeleton", "label"), ("centres", "centres"))}
    return {"volumes": len(store), "before": before / voxels, "after": after / voxels, "parts": parts,
            "skeleton_s": (statistics.mean(before_s), statistics.mean(after_s)), "skeletons": len(after_s)}


def _cgroup(cap_bytes: int | None) -> Path:
    group = CGROUP_ROOT / f"bench_scale_{os.getpid()}"
    group.mkdir()
    if cap_bytes is not None:
        (group / "memory.limit_in_bytes").write_text(str(cap_bytes))
    return group


def _evict(folder: Path) -> None:
    """Drop the store's pages from the page cache (these files only), so a capped run pays for reading them."""
    for p in [*folder.glob("*.npy"), *folder.glob("*.chunks")]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def train_run(name: str, data: Path, work: Path, cap_bytes: int | None, iterations: int, nproc: int = 1, **overrides) -> dict:
    """One epoch of ``iterations`` of the default training (plus ``overrides``) in a child cgroup; its figures."""
    out = work / name
    timer_yaml = work / "timer.yaml"
    timer_yaml.write_text(
        "step_timer:\n  _target_: bench_scale.StepTimer\n"
        f"  out: '{out}'\n"
        "train#trainer#train_handlers: '$@train#handlers + [@step_timer]'\n"
        # validation cut to one centre window of two volumes (item 3 measures validation)
        "validate#dataset#data: \"$@store['val'][:2]\"\n"
        "validate#preprocessing: \"$monai.transforms.Compose([transforms.crop.StoredVolumed(['image', 'label']), "
        "monai.transforms.CenterSpatialCropd(['image', 'label'], @patch_size), transforms.intensity.NormalizeWithStatsd('image'), "
        "monai.transforms.CastToTyped('label', torch.float32)])\"\n"
    )
    configs = [str(TRAIN)]
    settings = {"dataset_dir": str(data), "output_dir": str(work / "outputs" / name), "ckpt_dir": str(work / "models" / name),
                "cache_dir": str(work / "store"), "epochs": 1, "val_score": False, "training_curves": False,
                "tensorboard_preview": False, "train#trainer#epoch_length": iterations, **overrides}
    from pipeline.cli.launch import torchrun_command

    if nproc > 1:
        configs += [str(REPO / "bundle" / "configs" / "multi_gpu_train.yaml"), str(timer_yaml)]
        cmd = torchrun_command(configs, "training", settings, nproc=nproc)
    else:
        configs.append(str(timer_yaml))
        cmd = [sys.executable, "-m", "monai.bundle", "run", "training", f"--config_file={configs}",
               *(f"--{k}={v!r}" for k, v in settings.items())]
    group = _cgroup(cap_bytes)
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'bench'}", "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc)),
           "BENCH_T0": repr(time.time())}
    log = work / f"{name}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                              preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
    wall = time.monotonic() - t0
    peak = int((group / "memory.max_usage_in_bytes").read_text())
    oom = "oom_kill 0" not in (group / "memory.oom_control").read_text() and "oom_kill " in (group / "memory.oom_control").read_text()
    group.rmdir()
    result = {"name": name, "rc": proc.returncode, "wall_s": wall, "cgroup_peak_mib": peak / 2**20, "oom_killed": oom,
              "cap_mib": None if cap_bytes is None else cap_bytes / 2**20}
    text = log.read_text()
    result["mode"] = "in RAM" if "volume store: in RAM" in text else "memory-mapped" if "volume store: memory-mapped" in text else "?"
    if proc.returncode != 0:
        result["tail"] = text[-1500:]
        return result
    timers = [json.loads((out / f"timer_rank{r}.json").read_text()) for r in range(nproc)]
    its = timers[0]["iterations"]
    steps = [b - a for a, b in zip(its, its[1:])][2:]  # steady state: without the first iterations
    cpu = [b - a for a, b in zip(timers[0]["cpu"], timers[0]["cpu"][1:])][2:]
    result.update({
        "startup_s": timers[0]["started"] - timers[0]["process_start"], "iterations": len(its),
        "s_per_it": statistics.median(steps) if steps else float("nan"),
        "cpu_s_per_it": statistics.median(cpu) if cpu else float("nan"),
        "data_s_per_it": statistics.median(timers[0]["data"][3:]) if len(timers[0]["data"]) > 3 else float("nan"),
        "peak_rss_mib": sum(t["peak_rss_mib"] for t in timers), "rss_anon_mib": sum(t["rss_anon_mib"] for t in timers),
    })
    return result


def validation_share(data: Path, store_dir: Path, train_step_s: float, max_cases: int) -> dict:
    """Measured sliding-window time of one 320^3 validation volume vs the training step; share at Kaggle scale."""
    import torch
    from monai.bundle import ConfigParser

    from pipeline.data.datalist import prepare_datalists
    from pipeline.data.store import build_store

    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    lists = prepare_datalists(data, check=False)
    parser["store"] = build_store(lists, store_dir)
    parser.get_parsed_content("imports")
    net = parser.get_parsed_content("network").eval()
    inferer = parser.get_parsed_content("validate#inferer")
    item = parser.get_parsed_content("validate#dataset")[0]
    t0 = time.perf_counter()
    with torch.no_grad():
        inferer(item["image"][None], net)
    per_volume = time.perf_counter() - t0
    n_val = KAGGLE["epochs"] // KAGGLE["val_interval"] + 1
    val_time = n_val * min(max_cases, KAGGLE["val"]) * per_volume
    train_time = KAGGLE["epochs"] * KAGGLE["train"] * train_step_s
    full = n_val * KAGGLE["val"] * per_volume
    return {"per_volume_s": per_volume, "subset_share": val_time / (val_time + train_time), "full_share": full / (full + train_time)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40, help="volumes of 320^3 to generate (once)")
    parser.add_argument("--data", default=str(REPO / "data" / "bench_scale"))
    parser.add_argument("--work", default=str(REPO / "data" / "bench_scale_work"), help="store, outputs, logs")
    parser.add_argument("--mem-cap", default=None, help="'kaggle' (0.55 x uint8 dataset + 1.1 GiB) or MiB; also runs capped")
    parser.add_argument("--visits", type=int, default=30, help="dataset visits per loader measurement")
    parser.add_argument("--iterations", type=int, default=6, help="iterations of each training run's (only) epoch")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: store,loader,train,ddp,val")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    data, work = Path(args.data), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    generate(data, args.n)
    size = dataset_bytes(data)
    print(f"dataset {data}: {len(list((data / 'train_images').iterdir()))} volumes, {size / 2**30:.2f} GiB of uint8 images + labels", flush=True)

    results = []
    if "train" not in skip:
        import shutil

        shutil.rmtree(work / "store", ignore_errors=True)
        shutil.rmtree(work / "models", ignore_errors=True)
        results.append(train_run("first_run_default", data, work, None, args.iterations))
        results.append(train_run("second_run_mmap", data, work, None, args.iterations, store_mode="mmap"))
        if args.mem_cap:
            cap = int(0.55 * size + 1.1 * 2**30) if args.mem_cap == "kaggle" else int(float(args.mem_cap) * 2**20)
            _evict(work / "store")
            results.append(train_run("capped_default", data, work, cap, args.iterations))
            if "ddp" not in skip:
                _evict(work / "store")
                results.append(train_run("capped_default_ddp2", data, work, cap, args.iterations, nproc=2))
        elif "ddp" not in skip:
            results.append(train_run("default_ddp2", data, work, None, args.iterations, nproc=2))
        print("\n== training, one epoch, default settings (+ overrides named)")
        for r in results:
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
        ok = {r["name"]: r for r in results if r["rc"] == 0}
        if "first_run_default" in ok and "second_run_mmap" in ok:
            print(f"second start-up / first (store build): {ok['second_run_mmap']['startup_s'] / ok['first_run_default']['startup_s']:.3f}")
        ram = next((r for r in ok.values() if r["mode"] == "in RAM"), None)
        if "second_run_mmap" in ok and ram is not None:
            m = ok["second_run_mmap"]
            print(f"memory-mapped step / in-RAM step ({ram['name']}): wall {m['s_per_it'] / ram['s_per_it']:.3f}, "
                  f"process CPU time {m['cpu_s_per_it'] / ram['cpu_s_per_it']:.3f}; data wait per step "
                  f"{m['data_s_per_it'] * 1000:.0f} ms vs {ram['data_s_per_it'] * 1000:.0f} ms")
    if "store" not in skip:
        f = store_footprint(data, work / "store")
        parts = ", ".join(f"{k} {v:.3f}" for k, v in f["parts"].items())
        print(f"\n== store on disk with skeletons, {f['volumes']} volumes: before (format 1, uncompressed .npy) "
              f"{f['before']:.3f} bytes per voxel, after {f['after']:.3f} ({parts}), x{f['after'] / f['before']:.3f}")
        before_s, after_s = f["skeleton_s"]
        print(f"tubed skeleton, CPU s per 320^3 volume (one thread, mean of {f['skeletons']}, the same voxels): before "
              f"(scikit-image) {before_s:.2f}, after (pipeline.data.thinning) {after_s:.2f}, x{after_s / before_s:.3f}",
              flush=True)
    if "loader" not in skip:
        print("\n== loader, one thread, patches from 320^3 volumes (train.yaml's crop, memory-mapped)")
        for on_device, what in ((False, "CPU augmentation (CPU training)"), (True, "augmentation on the GPU (CUDA default)")):
            for patch in (64, 128):
                rates = loader_rate(data, work / "store", patch, args.visits, on_device)
                found = ", ".join(f"{name} {rate:.1f}" for name, (rate, _) in rates.items())
                ratios = ", ".join(f"after / {name} x{ratio:.3f}" for name, (_, ratio) in rates.items() if name != "after")
                print(f"{what}, {patch}^3: patches per CPU-second: {found}; {ratios} (medians of 5 interleaved rounds)", flush=True)
    if "val" not in skip:
        step = next((r["s_per_it"] for r in results if r.get("name") == "second_run_mmap" and r["rc"] == 0), None)
        if step is not None:
            from monai.bundle import ConfigParser

            p = ConfigParser()
            p.read_config(str(TRAIN))
            max_cases = p["val_max_cases"]
            v = validation_share(data, work / "store", step, max_cases)
            print(f"\n== validation: one 320^3 volume {v['per_volume_s']:.1f} s (sliding window, default overlap) vs training step {step:.2f} s")
            print(f"share of training time at Kaggle scale ({KAGGLE}): val_max_cases={max_cases}: {v['subset_share']:.1%}; every volume: {v['full_share']:.1%}")
    return 1 if any(r["rc"] != 0 for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
