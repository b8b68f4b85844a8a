"""One launcher for every machine: a single process on one GPU or the CPU, DDP through torchrun on several.

``launch`` decides from the process count: with two or more processes (by default one per visible CUDA GPU), or
several nodes, it starts ``python -m torch.distributed.run`` (torchrun) on the bundle with
``bundle/configs/multi_gpu_train.yaml`` added to the configs; otherwise it runs the bundle in this process.

- One node: ``--standalone`` (torchrun binds a free port on this machine itself).
- Several nodes: run ``launch`` on every node with the same ``nnodes`` and ``rdzv_endpoint`` (``host:port`` of a
  machine all nodes reach; node 0 hosts it) and its own ``node_rank``; the c10d rendezvous waits for all of them.
- A failure on any rank (exception, kill, out of memory) makes torchrun stop every worker of the job and return
  non-zero; SIGTERM/SIGUSR1/SIGINT sent to the launcher are passed to torchrun, whose workers checkpoint and stop; a rank stuck in a collective raises after the config's ``dist_timeout_minutes``. With
  ``max_restarts`` > 0 torchrun restarts the whole group instead, and training resumes from its newest checkpoint.

Works from any directory: the configs find their files from ``bundle_root`` (see :mod:`pipeline.utils.paths`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.utils.paths import BUNDLE, INSTALLED_BUNDLE, PACKAGES_DIR

__all__ = ["MULTI_GPU_CONFIG", "default_nproc", "cuda_available", "cli_overrides", "torchrun_command", "launch"]

MULTI_GPU_CONFIG = BUNDLE / "configs" / "multi_gpu_train.yaml"

logger = logging.getLogger(__name__)


def default_nproc() -> int:
    """Processes per node by default: one per visible CUDA GPU, else one."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def cuda_available() -> bool:
    """Whether the processes of a launch run on CUDA GPUs (torch is imported here, not by this module: the main job's
    own process asks in a child, see :func:`pipeline.utils.memory.run_apart`)."""
    import torch

    return torch.cuda.is_available()


def cli_overrides(overrides: dict[str, Any]) -> list[str]:
    """Bundle overrides as ``monai.bundle`` command-line arguments, ``--key=<python literal>``.

    The bundle CLI (python-fire) parses each value as a Python literal, so ``repr`` round-trips strings (also
    ones that look like numbers), numbers, lists, dicts, booleans and None.
    """
    return [f"--{key}={value!r}" for key, value in overrides.items()]


def torchrun_command(
    config_files: Sequence[str],
    run_id: str,
    overrides: dict[str, Any],
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
) -> list[str]:
    """The torchrun command line that runs ``run_id`` of the bundle on ``nproc`` processes of this node.

    Args:
        config_files: the bundle configs, merged left to right (``multi_gpu_train.yaml`` among them).
        run_id: the bundle key to run, e.g. "training".
        overrides: bundle keys and their values.
        nproc: processes on this node.
        nnodes: machines in the job.
        node_rank: this machine's index, 0 .. nnodes - 1.
        rdzv_endpoint: ``host:port`` of the rendezvous, required with several nodes.
        max_restarts: times torchrun restarts the worker group after a failure.

    Raises:
        ValueError: several nodes without ``rdzv_endpoint``, or a ``node_rank`` outside the job.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--max_restarts={max_restarts}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        if not rdzv_endpoint:
            msg = f"nnodes={nnodes} needs rdzv_endpoint (host:port of a machine every node reaches)"
            raise ValueError(msg)
        if not 0 <= node_rank < nnodes:
            msg = f"node_rank={node_rank} outside 0..{nnodes - 1}"
            raise ValueError(msg)
        cmd += [
            f"--nnodes={nnodes}",
            f"--node_rank={node_rank}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={rdzv_endpoint}",
            f"--rdzv_id={run_id}",
        ]
    cmd += ["-m", "monai.bundle", "run", run_id, f"--config_file={list(config_files)!r}", *cli_overrides(overrides)]
    return cmd


def launch(
    config_files: Sequence[str],
    run_id: str = "training",
    overrides: dict[str, Any] | None = None,
    nproc: int | None = None,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
    mixin: str | os.PathLike | None = MULTI_GPU_CONFIG,
    cuda: bool | None = None,
) -> int:
    """Run ``run_id`` of the bundle on every GPU of every node, or in this process where there is one device.

    DDP (torchrun, with ``multi_gpu_train.yaml`` appended to ``config_files``) when ``nproc`` >= 2, ``nnodes`` > 1
    or the multi-GPU config is among ``config_files``; on the CPU the processes use gloo, each with
    ``OMP_NUM_THREADS`` = cores / nproc unless the variable is set. Otherwise ``monai.bundle.run`` in this process.

    Args:
        config_files: the bundle configs, e.g. ``["bundle/configs/train.yaml"]``.
        run_id: the bundle key to run.
        overrides: bundle keys and values (``{"epochs": 4, "dataset_dir": "/data"}``).
        nproc: processes on this node; default one per CUDA GPU (1 without CUDA).
        nnodes: machines in the job.
        node_rank: this machine's index.
        rdzv_endpoint: ``host:port`` of the rendezvous, required with ``nnodes`` > 1.
        max_restarts: torchrun restarts of the worker group after a failure (resuming from checkpoints).
        mixin: the config appended under DDP (the training mixin); None for configs that handle torchrun themselves
            (inference.yaml).
        cuda: whether the processes use CUDA GPUs (else each gets its share of the cores); None: as torch sees
            this machine (:func:`cuda_available`).

    Returns:
        The exit status: torchrun's under DDP (non-zero when any rank failed), 0 after an in-process run.

    Raises:
        ValueError: ``nproc`` < 1, or a multi-node setting that cannot work (see ``torchrun_command``).
        Exception: whatever the bundle raises when it runs in this process.

    Example::

        rc = launch(["bundle/configs/train.yaml"], "training", {"epochs": 2}, nproc=2)
    """
    overrides = dict(overrides or {})
    nproc = default_nproc() if nproc is None else int(nproc)
    if nproc < 1:
        msg = f"nproc={nproc}: need at least one process"
        raise ValueError(msg)
    configs = [str(c) for c in config_files]
    mixin = Path(mixin).resolve() if mixin is not None else None
    multi = any(Path(c).resolve() == mixin for c in configs)
    if nproc == 1 and nnodes == 1 and not multi:
        from monai.bundle import run

        run(run_id, config_file=configs[0] if len(configs) == 1 else configs, **overrides)
        return 0
    if mixin is not None and not multi:
        configs.append(str(mixin))
    cmd = torchrun_command(configs, run_id, overrides, nproc, nnodes, node_rank, rdzv_endpoint, max_restarts)
    env = dict(os.environ)
    if BUNDLE != INSTALLED_BUNDLE:  # a checkout, perhaps not installed: the workers import these same packages
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGES_DIR), env.get("PYTHONPATH")]))
    if not (cuda_available() if cuda is None else cuda):
        # torchrun would pin every process to one thread; share the cores instead
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logger.info("launching %d process(es) on node %d of %d: %s", nproc, node_rank, nnodes, " ".join(cmd))
    return _run_forwarding_signals(cmd, env)


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun, passing on SIGTERM/SIGUSR1/SIGINT (the workers then checkpoint and stop, see
    ``pipeline.training.checkpoint``) instead of dying and leaving it orphaned. Returns 128 + the signal number after a
    signal, else torchrun's exit code."""
    from pipeline.utils.signals import PREEMPT_SIGNALS

    proc = subprocess.Popen(cmd, env=env)
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        proc.send_signal(signum)

    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        return proc.wait()
    previous = {sig: signal.signal(sig, forward) for sig in PREEMPT_SIGNALS}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received and rc != 0 else rc
