"""DDP training through the real bundle configs (train.yaml + multi_gpu_train.yaml), 2 gloo processes on the CPU:
disjoint shards, validation Dice gathered across ranks, per-rank logs, a killed rank ending the job, two "nodes"."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.bundle import ConfigParser

from pipeline.cli.launch import MULTI_GPU_CONFIG, launch, torchrun_command
from pipeline.data.datalist import prepare_datalists
from pipeline.training.checkpoint import completed_epochs, find_latest_checkpoint
from pipeline.utils import distributed
from tests._ddp_helpers import free_port, hang_worker, recorder_mixin, weights_mixin
from tests.conftest import TINY_TRAIN

REPO = Path(__file__).resolve().parents[2]
TRAIN_CONFIG = REPO / "bundle" / "configs" / "train.yaml"
# side outputs that do not matter here, switched off to keep each run short
QUIET = {"training_curves": False, "tensorboard_preview": False, "monitor_resources": False, "check_data": False,
         "store_mode": "mmap"}  # every rank memory-maps the volume store the ranks built together


@pytest.fixture(scope="module")
def ddp_dataset(tmp_path_factory) -> Path:
    """8 small volumes of 2 scrolls: 4 training and 4 validation cases, 2 of each per rank."""
    from pipeline.data.synth import SynthConfig, generate_dataset

    out = tmp_path_factory.mktemp("ddp") / "data"
    return generate_dataset(out, SynthConfig(n_train=8, n_test=1, shapes=((36, 40, 32), (40, 36, 44)), n_scrolls=2))


def _overrides(dataset: Path, root: Path, **extra) -> dict:
    return {**TINY_TRAIN, **QUIET, "dataset_dir": str(dataset), "output_dir": str(root / "out"),
            "ckpt_dir": str(root / "models"), **extra}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _records(folder: Path, world: int) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_one_local_rank_at_a_time_staggers_the_ranks_of_a_job(monkeypatch):
    """Two ranks of one job (threads: flock locks are per open file) never run the block together; a single
    process takes no lock."""
    import threading

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"stagger{os.getpid()}")
    spans = []

    def rank() -> None:
        with distributed.one_local_rank_at_a_time("score"):
            start = time.monotonic()
            time.sleep(0.2)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=rank) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (_, first_end), (second_start, _) = sorted(spans)
    assert second_start >= first_end
    monkeypatch.setenv("WORLD_SIZE", "1")
    with distributed.one_local_rank_at_a_time("score"), distributed.one_local_rank_at_a_time("score"):
        pass  # nested in one process: no lock taken, no deadlock


def test_partition_for_rank_gives_disjoint_even_shares(monkeypatch):
    data = list(range(7))
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        shares.append(distributed.partition_for_rank(data, seed=3))
    assert len(shares[0]) == len(shares[1]) == 4 and set(shares[0]) | set(shares[1]) == set(data)
    uneven = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        uneven.append(distributed.partition_for_rank(data, shuffle=False, even_divisible=False))
    assert sorted(uneven[0] + uneven[1]) == data
    with pytest.raises(ValueError, match="1 items cannot be shared by 2 ranks"):
        distributed.partition_for_rank([0], even_divisible=False)


def test_seed_rank_decorrelates_augmentation(monkeypatch):
    from monai.data import Dataset
    from monai.transforms import Compose, RandGaussianNoise

    def first_sample(rank: int) -> torch.Tensor:
        monkeypatch.setenv("RANK", str(rank))
        dataset = Dataset([torch.zeros(1, 4, 4)], transform=Compose([RandGaussianNoise(prob=1.0)]))
        assert distributed.seed_rank(5, dataset) == 5 + rank
        return dataset[0]

    assert torch.equal(first_sample(0), first_sample(0))
    assert not torch.equal(first_sample(0), first_sample(1))


def test_init_logs_and_teardown_after_error(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO)  # as the bundle's logging.conf sets it
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="start multi_gpu_train.yaml with torchrun"):
        distributed.init_distributed("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    distributed.init_distributed("cpu", timeout_minutes=1)
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    path = distributed.setup_rank_logging(tmp_path / "logs")
    try:
        class Failing:
            def run(self) -> None:
                raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            distributed.run_and_teardown(Failing())
        assert not dist.is_initialized()
        assert path.name == "training_rank0.log" and "rank 0 of 1" in path.read_text()
    finally:
        distributed.destroy_distributed()
        root = logging.getLogger()
        for h in [h for h in root.handlers if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path]:
            root.removeHandler(h)
            h.close()


def test_collective_timeout_bounds_a_hang(tmp_path):
    mp.spawn(hang_worker, args=(2, free_port(), str(tmp_path), 0.05), nprocs=2)
    result = json.loads((tmp_path / "hang.json").read_text())
    assert result["outcome"] != "returned"
    assert result["elapsed"] < 30  # 3 s timeout; without it gloo would wait 30 minutes


def test_torchrun_command_single_and_multi_node():
    one = torchrun_command(["a.yaml"], "training", {"epochs": 2, "dataset_dir": "/d"}, nproc=2)
    assert "--standalone" in one and "--nproc_per_node=2" in one
    assert one[-3:] == ["--config_file=['a.yaml']", "--epochs=2", "--dataset_dir='/d'"]
    two = torchrun_command(["a.yaml"], "training", {}, nproc=4, nnodes=2, node_rank=1, rdzv_endpoint="h:29400")
    assert {"--nnodes=2", "--node_rank=1", "--rdzv_backend=c10d", "--rdzv_endpoint=h:29400"} <= set(two)
    with pytest.raises(ValueError, match="needs rdzv_endpoint"):
        torchrun_command(["a.yaml"], "training", {}, nproc=1, nnodes=2)


def test_monai_logging_handlers_disabled_off_rank0(monkeypatch, tmp_path):
    """MONAI's StatsHandler/TensorBoardStatsHandler hold no collectives: off rank 0 they are switched off (a
    TensorBoardStatsHandler without a writer would make its own in ./runs)."""
    for rank, expect_disabled in (("0", False), ("1", True)):
        monkeypatch.setenv("RANK", rank)
        parser = ConfigParser()
        parser.read_config([str(TRAIN_CONFIG), str(MULTI_GPU_CONFIG)])
        parser["output_dir"] = str(tmp_path)  # rank 0 builds its TensorBoard writer there
        handlers = {}
        for section in ("train", "validate"):
            for i, h in enumerate(parser[f"{section}#handlers"]):
                if isinstance(h, dict) and h.get("_target_") in ("TensorBoardStatsHandler", "StatsHandler"):
                    handlers[f"{section}#handlers#{i}"] = h
        assert len(handlers) == 3
        for key in handlers:
            flag = parser.get_parsed_content(f"{key}#_disabled_", instantiate=False) if "_disabled_" in handlers[key] else False
            if isinstance(flag, str):  # expression referencing tb_writer: evaluate it
                flag = parser.get_parsed_content(f"{key}#_disabled_")
            assert bool(flag) is expect_disabled, (rank, key)


def test_ddp_training_shards_and_gathered_dice(ddp_dataset, tmp_path, capfd):
    """With EMA and skeleton recall on (the other DDP tests train without): the ranks split the skeleton build, every
    rank validates its own EMA copy (no collective), and model.pt, the EMA at the best epoch, scores the gathered
    best Dice again in one process."""
    rec = tmp_path / "records"
    configs = [str(TRAIN_CONFIG), str(recorder_mixin(tmp_path / "recorder.yaml", rec))]
    overrides = _overrides(ddp_dataset, tmp_path, ema=True, skeleton_recall_weight=1.0)
    assert launch(configs, "training", overrides, nproc=2) == 0
    console = capfd.readouterr().out

    records = _records(rec, 2)
    assert [r["world_size"] for r in records] == [2, 2]
    lists = prepare_datalists(ddp_dataset, check=False)
    train_ids, val_ids = {c["id"] for c in lists["train"]}, [c["id"] for c in lists["val"]]
    for epoch in map(str, range(1, TINY_TRAIN["epochs"] + 1)):
        seen = [set(r["train_ids"][epoch]) for r in records]
        assert not seen[0] & seen[1], f"epoch {epoch}: ranks trained on the same cases {seen}"
        assert seen[0] | seen[1] == train_ids
    # every validation case scored once per validation, none twice
    n_val = len(records[0]["val_metrics"])
    assert sorted(records[0]["val_ids"] + records[1]["val_ids"]) == sorted(val_ids * n_val)
    dice = [[m["val_dice"] for m in r["val_metrics"]] for r in records]
    assert dice[0] == dice[1]  # gathered: both ranks computed the metric over all cases

    # the best model, evaluated again in one process on the same data, scores the same
    parser = ConfigParser()
    parser.read_config(str(TRAIN_CONFIG))
    parser.update(_overrides(ddp_dataset, tmp_path / "single"))
    parser.get_parsed_content("imports")
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True))
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    assert evaluator.state.metrics["val_dice"] == pytest.approx(max(dice[0]), abs=1e-5)

    # per-rank log files; the console is rank 0's
    logs = tmp_path / "out" / "logs"
    assert "rank 1 of 2" in (logs / "training_rank1.log").read_text()
    assert "rank 0 of 2" in (logs / "training_rank0.log").read_text()
    assert "rank 0 of 2" in console and "rank 1 of 2" not in console
    assert "effective batch 4 patches/step" in console


def test_killed_rank_ends_the_job_and_the_run_resumes(ddp_dataset, tmp_path):
    """SIGKILL one rank mid-training: the whole job exits non-zero within 60 s; relaunched, it resumes from the
    newest checkpoint and completes with the right epoch count."""
    overrides = _overrides(ddp_dataset, tmp_path, epochs=1000, val_interval=1000)
    cmd = torchrun_command([str(TRAIN_CONFIG), str(MULTI_GPU_CONFIG)], "training", overrides, nproc=2)
    log1 = tmp_path / "out" / "logs" / "training_rank1.log"
    ckpts = tmp_path / "models"
    with open(tmp_path / "torchrun.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(ckpts.glob("checkpoint_epoch=*.pt")):  # killed after at least one checkpoint
            assert proc.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        pid = int(re.search(r"rank 1 of 2 .*pid (\d+)", log1.read_text()).group(1))
        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        rc = proc.wait(timeout=60)
        assert rc != 0
        elapsed = time.monotonic() - start
        print(f"DDP job ended {elapsed:.1f} s after rank 1 was killed (exit code {rc})")  # the figure of issue 10
        assert elapsed < 60
    finally:
        _kill_group(proc)

    latest = find_latest_checkpoint(ckpts)
    done = int(re.search(r"epoch=(\d+)", latest.name).group(1))
    target = done + 2
    assert launch([str(TRAIN_CONFIG)], "training", {**overrides, "epochs": target}, nproc=2) == 0
    assert completed_epochs(ckpts) == target
    rank0 = (tmp_path / "out" / "logs" / "training_rank0.log").read_text()
    assert "Resumed from" in rank0 and f"at epoch {done}" in rank0


def test_multi_gpu_config_with_one_process(ddp_dataset, tmp_path):
    """torchrun --nproc_per_node=1 with multi_gpu_train.yaml (one GPU, the same command as for several): the DDP
    network needs the process group although the world has one rank."""
    overrides = _overrides(ddp_dataset, tmp_path, epochs=1)
    cmd = torchrun_command([str(TRAIN_CONFIG), str(MULTI_GPU_CONFIG)], "training", overrides, nproc=1)
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert completed_epochs(tmp_path / "models") == 1
    assert "rank 0 of 1" in (tmp_path / "out" / "logs" / "training_rank0.log").read_text()


def test_two_nodes_on_one_machine_with_partitioned_cache(ddp_dataset, tmp_path):
    rec = tmp_path / "records"
    configs = [str(TRAIN_CONFIG), str(recorder_mixin(tmp_path / "recorder.yaml", rec)), str(MULTI_GPU_CONFIG)]
    overrides = _overrides(ddp_dataset, tmp_path, partition_cache=True)
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    try:
        for node in (0, 1):
            cmd = torchrun_command(configs, "training", overrides, nproc=1, nnodes=2, node_rank=node, rdzv_endpoint=endpoint)
            with open(tmp_path / f"node{node}.log", "w") as out:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        for node, proc in enumerate(procs):
            assert proc.wait(timeout=150) == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]
    finally:
        for proc in procs:
            _kill_group(proc)
    records = _records(rec, 2)
    assert [r["world_size"] for r in records] == [2, 2]
    # partitioned: each rank keeps its own cases every epoch, disjoint from the other's
    shares = [{tuple(sorted(set(ids))) for ids in r["train_ids"].values()} for r in records]
    assert all(len(s) == 1 for s in shares)
    assert not set(next(iter(shares[0]))) & set(next(iter(shares[1])))
    assert not set(records[0]["val_ids"]) & set(records[1]["val_ids"])


@pytest.fixture(scope="module")
def ddp_reference(ddp_dataset, tmp_path_factory) -> Path:
    """The final weights of an uninterrupted 2-process run of 2 epochs (no validation), for the stopped ones."""
    root = tmp_path_factory.mktemp("ddp_reference")
    assert launch([str(TRAIN_CONFIG)], "training", _overrides(ddp_dataset, root, epochs=2, val_interval=1000), nproc=2) == 0
    return root / "models" / "checkpoint_final.pt"


def _bit_equal(final: Path, reference: Path) -> bool:
    done, expected = (torch.load(p, weights_only=True)["model"] for p in (final, reference))
    return all(torch.equal(done[k], expected[k]) for k in expected)


def test_sigterm_on_one_rank_checkpoints_all_ranks_and_resume_is_bit_equal(ddp_dataset, ddp_reference, tmp_path):
    """SIGTERM reaching rank 1 only, in the first iteration of epoch 2: both ranks agree (all-reduce), save that
    iteration and exit 128 + 15; the relaunched run ends with weights bit-equal to an uninterrupted run's."""

    mixin = tmp_path / "signal.yaml"
    mixin.write_text(
        "signal_at:\n  _target_: tests._faults.SignalAt\n  iteration: 3\n  rank: 1\n"
        "train#trainer#train_handlers: '$@train#handlers + [@signal_at]'\n"
    )
    overrides = _overrides(ddp_dataset, tmp_path / "run", epochs=2, val_interval=1000)
    assert launch([str(TRAIN_CONFIG), str(mixin)], "training", overrides, nproc=2) != 0
    models, logs = tmp_path / "run" / "models", tmp_path / "run" / "out" / "logs"
    latest = find_latest_checkpoint(models)
    assert latest.name == "checkpoint_epoch=0002_iter=000003.pt"  # the iteration the signal arrived in: none lost
    for rank in (0, 1):
        assert "SIGTERM received: training stopped at epoch 2, iteration 3" in (logs / f"training_rank{rank}.log").read_text()

    assert launch([str(TRAIN_CONFIG)], "training", overrides, nproc=2) == 0
    assert "Resumed from" in (logs / "training_rank0.log").read_text()
    assert _bit_equal(models / "checkpoint_final.pt", ddp_reference)


def test_clock_cut_stops_every_rank_at_one_iteration_and_resume_is_bit_equal(ddp_dataset, ddp_reference, tmp_path):
    """The clock asked on rank 0 only (time_limit) stops both ranks in the first iteration of epoch 2: both validate
    the newest weights, the checkpoint is that iteration's and the exit code 0; the relaunched run ends bit-equal
    to an uninterrupted run's (the validation's random numbers undone)."""
    overrides = _overrides(ddp_dataset, tmp_path / "run", epochs=2, val_interval=1000,
                           clock={"_target_": "tests._faults.ClockCutAt", "iteration": 3})
    assert launch([str(TRAIN_CONFIG)], "training", overrides, nproc=2) == 0
    models, logs = tmp_path / "run" / "models", tmp_path / "run" / "out" / "logs"
    assert find_latest_checkpoint(models).name == "checkpoint_epoch=0002_iter=000003.pt"
    assert not (models / "checkpoint_final.pt").exists() and (models / "model.pt").is_file()  # validated at the cut
    for rank in (0, 1):
        assert "stopped by the clock at epoch 2, iteration 3" in (logs / f"training_rank{rank}.log").read_text()

    del overrides["clock"]
    assert launch([str(TRAIN_CONFIG)], "training", overrides, nproc=2) == 0
    assert _bit_equal(models / "checkpoint_final.pt", ddp_reference)


def test_resume_from_a_read_only_copy_and_init_from_under_ddp(ddp_dataset, ddp_reference, tmp_path):
    """Session 1 cut by the clock; session 2 continues it from a read-only copy (resume_from) into another ckpt_dir
    on 2 ranks, bit-equal to an uninterrupted run, the copy untouched; a new 2-rank run from the result's weights
    (init_from, another patch) starts every rank from the file's weights."""
    s1 = _overrides(ddp_dataset, tmp_path / "s1", epochs=2, val_interval=1000,
                    clock={"_target_": "tests._faults.ClockCutAt", "iteration": 3})
    assert launch([str(TRAIN_CONFIG)], "training", s1, nproc=2) == 0
    source = tmp_path / "input" / "models"
    source.parent.mkdir()
    (tmp_path / "s1" / "models").rename(source)
    for p in [source, *source.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    before = {p.name: p.read_bytes() for p in source.iterdir()}

    s2 = _overrides(ddp_dataset, tmp_path / "s2", epochs=2, val_interval=1000, resume_from=str(source))
    assert launch([str(TRAIN_CONFIG)], "training", s2, nproc=2) == 0
    models = tmp_path / "s2" / "models"
    assert "Resuming from" in (tmp_path / "s2" / "out" / "logs" / "training_rank0.log").read_text()
    assert _bit_equal(models / "checkpoint_final.pt", ddp_reference)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before

    model = models / "model.pt"
    mixin = weights_mixin(tmp_path / "weights.yaml", tmp_path / "at_start")
    ft = _overrides(ddp_dataset, tmp_path / "ft", epochs=1, val_interval=1000, init_from=str(model),
                    patch_size=[16, 16, 16])
    assert launch([str(TRAIN_CONFIG), str(mixin)], "training", ft, nproc=2) == 0
    saved = torch.load(model, weights_only=True)
    for rank in (0, 1):
        at_start = torch.load(tmp_path / "at_start" / f"weights_rank{rank}.pt", weights_only=True)
        assert all(torch.equal(at_start[k], v) for k, v in saved.items()), rank
        log = (tmp_path / "ft" / "out" / "logs" / f"training_rank{rank}.log").read_text()
        assert f"Initialised the weights from {model}" in log
