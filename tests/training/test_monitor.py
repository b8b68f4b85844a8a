"""Tests for pipeline.training.monitor: progress/ETA lines and throughput/resource figures on a tiny ignite Engine.

Time is a fake clock: the steps and the loader advance it by exact amounts, so the figures are checked exactly and
a loaded machine cannot fail them (the real speed is measured in bench/, never here)."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import ignite.distributed as idist
import pytest
import torch
from ignite.engine import Engine, Events

from pipeline.training import monitor as monitor_module
from pipeline.training.monitor import (
    ProgressHandler,
    ThroughputMonitor,
    batch_size_of,
    loss_of,
)

BATCH = 3


@pytest.fixture(autouse=True)
def _info_logging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


class _FakeClock:
    """``perf_counter`` for the monitor's module: it moves only when a step or the loader ``sleep``s."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


CLOCK = _FakeClock()


@pytest.fixture(autouse=True)
def _fake_clock(monkeypatch: pytest.MonkeyPatch) -> _FakeClock:
    monkeypatch.setattr(monitor_module, "time", CLOCK)
    return CLOCK


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"image": torch.zeros(BATCH, 1, 4, 4, 4)} for _ in range(n)]


class _SlowLoader:
    """Iterable whose every batch takes ``delay`` seconds to produce."""

    def __init__(self, n: int, delay: float) -> None:
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in _batches(self.n):
            CLOCK.sleep(self.delay)
            yield batch


class _FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


def _sleeping_engine(compute_s: float) -> Engine:
    def step(engine: Engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        CLOCK.sleep(compute_s)
        return {"loss": torch.tensor(1.0 / engine.state.iteration)}

    return Engine(step)


def test_throughput_consistent_with_iterations() -> None:
    engine = _sleeping_engine(0.01)
    writer = _FakeWriter()
    monitor = ThroughputMonitor(summary_writer=writer, device="cpu")
    monitor.attach(engine)
    wall: dict[int, float] = {}
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: wall.__setitem__(e.state.epoch, CLOCK.perf_counter()))
    engine.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: wall.__setitem__(e.state.epoch, CLOCK.perf_counter() - wall[e.state.epoch])
    )
    engine.run(_batches(12), max_epochs=2)

    assert sorted(monitor.history) == [1, 2]
    for epoch, figures in monitor.history.items():
        assert figures["samples"] == 12 * BATCH
        assert figures["iterations"] == 12
        expected = 60.0 * 12 * BATCH / wall[epoch]
        assert wall[epoch] == pytest.approx(12 * 0.01)
        assert figures["samples_per_min"] == pytest.approx(expected)
        assert figures["iter_time_ms"] == pytest.approx(1000 * wall[epoch] / 12)
    assert engine.state.throughput is monitor.history[2]
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"throughput/samples_per_min", "throughput/data_wait_frac", "throughput/rss_mib"} <= tags
    assert {step for _, _, step in writer.scalars} == {1, 2}


def test_data_wait_split_with_slow_loader() -> None:
    engine = _sleeping_engine(0.005)
    monitor = ThroughputMonitor()
    monitor.attach(engine)
    engine.run(_SlowLoader(8, delay=0.03), max_epochs=1)
    figures = monitor.history[1]
    assert figures["data_wait_s"] == pytest.approx(8 * 0.03)
    assert figures["compute_s"] == pytest.approx(8 * 0.005)
    assert figures["data_wait_frac"] == pytest.approx(0.03 / 0.035)
    assert figures["data_wait_s"] + figures["compute_s"] == pytest.approx(figures["epoch_time_s"], rel=1e-6)


def test_compute_bound_split() -> None:
    engine = _sleeping_engine(0.03)
    monitor = ThroughputMonitor()
    monitor.attach(engine)
    engine.run(_batches(6), max_epochs=1)
    assert monitor.history[1]["data_wait_frac"] == 0
    assert monitor.history[1]["compute_s"] == pytest.approx(6 * 0.03)


def test_memory_reported_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    engine = _sleeping_engine(0.0)
    monitor = ThroughputMonitor(device="cpu", name="test.throughput")
    monitor.attach(engine)
    engine.run(_batches(2), max_epochs=1)
    figures = monitor.history[1]
    assert figures["rss_mib"] > 10
    assert figures["peak_rss_mib"] >= figures["rss_mib"]
    assert "samples/min" in caplog.text
    assert "RSS" in caplog.text


def test_batch_transform_used() -> None:
    engine = _sleeping_engine(0.0)
    monitor = ThroughputMonitor(batch_transform=lambda batch: 5)
    monitor.attach(engine)
    engine.run(_batches(4), max_epochs=1)
    assert monitor.history[1]["samples"] == 20


def test_progress_logs_lines_when_not_a_tty(caplog: pytest.LogCaptureFixture) -> None:
    engine = _sleeping_engine(0.002)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.25)
    progress = ProgressHandler(optimizer=optimizer, log_every=5, name="test.progress")
    progress.attach(engine)
    assert not progress.use_bar  # pytest captures stdout: not a terminal
    engine.run(_batches(10), max_epochs=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "test.progress"]
    iteration_lines = [line for line in lines if " it " in line]
    assert len(iteration_lines) == 4
    assert iteration_lines[0].startswith("Epoch 1/2 it 5/10")
    assert "lr 2.500e-01" in iteration_lines[0]
    assert "loss 0.2000" in iteration_lines[0]
    assert "samples/s" in iteration_lines[0] and "ETA" in iteration_lines[0]
    summaries = [line for line in lines if "done in" in line]
    assert len(summaries) == 2
    expected_mean = sum(1.0 / i for i in range(1, 11)) / 10
    assert f"mean loss {expected_mean:.4f}" in summaries[0]


def test_progress_bar_mode_draws_tqdm(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    engine = _sleeping_engine(0.0)
    progress = ProgressHandler(mode="bar", name="test.progress")
    progress.attach(engine)
    engine.run(_batches(4), max_epochs=1)
    assert "Epoch 1/1" in capsys.readouterr().out
    assert not [r for r in caplog.records if " it " in r.getMessage()]


def test_eta_decreases_and_matches_iteration_time() -> None:
    engine = _sleeping_engine(0.01)
    progress = ProgressHandler(mode="log", log_every=100)
    progress.attach(engine)
    etas: list[float] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED(every=5), lambda e: etas.append(progress.eta_s))
    engine.run(_batches(10), max_epochs=3)
    assert len(etas) == 6
    assert all(a > b for a, b in zip(etas, etas[1:]))
    # after 5 of 30 iterations: 25 left at 10 ms each
    assert etas == pytest.approx([(30 - 5 * k) * 0.01 for k in range(1, 7)])


def test_rank_nonzero_is_silent(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    engine = _sleeping_engine(0.0)
    writer = _FakeWriter()
    ProgressHandler(mode="log", log_every=1, name="test.progress").attach(engine)
    monitor = ThroughputMonitor(summary_writer=writer, name="test.throughput")
    monitor.attach(engine)
    engine.run(_batches(3), max_epochs=1)
    assert not [r for r in caplog.records if r.name.startswith("test.")]
    assert not writer.scalars
    assert monitor.history[1]["samples"] == 3 * BATCH  # figures still computed on every rank


def test_disabled_handlers_attach_nothing() -> None:
    engine = _sleeping_engine(0.0)
    progress = ProgressHandler(enabled=False)
    monitor = ThroughputMonitor(enabled=False)
    progress.attach(engine)
    monitor.attach(engine)
    assert not engine.has_event_handler(progress._iteration_completed)
    assert not engine.has_event_handler(monitor._epoch_completed)
    engine.run(_batches(2), max_epochs=1)
    assert not monitor.history
    assert progress.eta_s is None


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ({"loss": torch.tensor(0.5), "pred": torch.zeros(2)}, 0.5),
        ([{"loss": torch.tensor(0.5)}, {"loss": torch.tensor(0.5)}], 0.5),
        (0.25, 0.25),
        (torch.tensor(2.0), 2.0),
        ({"pred": torch.zeros(1)}, None),
        (None, None),
    ],
)
def test_loss_of(output: object, expected: float | None) -> None:
    assert loss_of(output) == expected


def test_batch_size_of() -> None:
    assert batch_size_of({"image": torch.zeros(4, 1, 2, 2, 2)}) == 4
    assert batch_size_of([{"image": torch.zeros(1, 2, 2, 2)}] * 3) == 3
    assert batch_size_of((torch.zeros(2, 1), torch.zeros(2))) == 2
    with pytest.raises(ValueError, match="img"):
        batch_size_of({"label": torch.zeros(2)}, image_key="img")


def test_warns_when_logger_would_print_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with pytest.warns(UserWarning, match="test.quiet"):
        ThroughputMonitor(name="test.quiet").attach(_sleeping_engine(0.0))


def _distributed_worker(local_rank: int, out_dir: str) -> None:
    batches = [{"image": torch.zeros(local_rank + 1, 1, 2, 2, 2)} for _ in range(3)]
    engine = Engine(lambda e, b: {"loss": 0.0})
    monitor = ThroughputMonitor(device="cpu")
    monitor.attach(engine)
    engine.run(batches, max_epochs=1)
    (Path(out_dir) / f"rank{idist.get_rank()}.json").write_text(json.dumps(monitor.history[1]))


def test_throughput_all_reduced_across_two_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # with a GPU visible, ignite binds rank i to cuda:i even under gloo: hide it from the workers
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with idist.Parallel(backend="gloo", nproc_per_node=2, master_addr="127.0.0.1", master_port=port) as parallel:
        parallel.run(_distributed_worker, str(tmp_path))
    figures = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert figures[0]["samples"] == figures[1]["samples"] == 3 * (1 + 2)
    assert figures[0]["epoch_time_s"] == figures[1]["epoch_time_s"]
    assert figures[0]["rss_mib"] == figures[1]["rss_mib"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_reported_on_cuda(caplog: pytest.LogCaptureFixture) -> None:
    kept: list[torch.Tensor] = []

    def step(engine: Engine, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        kept.append(torch.ones(4, 1024, 1024, device="cuda"))  # 16 MiB per iteration, kept alive
        scratch = torch.ones(16, 1024, 1024, device="cuda")  # 64 MiB peak, freed at once
        del scratch
        return {"loss": 0.0}

    engine = Engine(step)
    monitor = ThroughputMonitor(name="test.throughput")
    assert monitor.device.type == "cuda"
    monitor.attach(engine)
    engine.run(_batches(3), max_epochs=1)
    figures = monitor.history[1]
    assert figures["cuda_allocated_mib"] >= 48
    assert figures["cuda_max_allocated_mib"] >= figures["cuda_allocated_mib"] + 60
    assert figures["cuda_reserved_mib"] >= figures["cuda_allocated_mib"]
    assert "rss_mib" not in figures
    assert "CUDA alloc" in caplog.text


def test_progress_handler_never_swallows_an_exception():
    """ignite re-raises only when no EXCEPTION_RAISED handler exists; the bar's clean-up handler is one."""
    from ignite.engine import Engine

    from pipeline.training.monitor import ProgressHandler

    def step(engine, batch):
        raise RuntimeError("boom")

    engine = Engine(step)
    ProgressHandler(mode="log").attach(engine)
    with pytest.raises(RuntimeError, match="boom"):
        engine.run([1, 2], max_epochs=1)
