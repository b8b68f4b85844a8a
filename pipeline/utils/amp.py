"""Mixed precision that follows the device: float16 (with a ``GradScaler``) on CUDA, bfloat16 on CPUs that compute
it natively, full precision elsewhere (bf16 autocast is emulated, and several times slower, on CPUs without AMX or
AVX512-bf16). Training, validation and every kind of inference decide with :func:`resolve_amp`.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["cpu_has_fast_bf16", "resolve_amp", "autocast_for"]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX-bf16 or AVX512-bf16). Without either, bf16 autocast on
    CPU is emulated and several times slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_amp(device: torch.device | str, amp: bool | str = "auto", dtype: str | torch.dtype | None = None) -> torch.dtype | None:
    """The autocast dtype for ``device``, or None for full precision.

    Args:
        device: where the model runs.
        amp: False/"off" disables mixed precision; True enables it; "auto" enables it on CUDA, and on CPU only
            where the CPU has native bf16 (``cpu_has_fast_bf16``).
        dtype: force a dtype ("bf16"/"fp16"); by default bfloat16 on CPU and float16 on CUDA.

    Raises:
        ValueError: an unknown dtype, or float16 asked for on CPU.
    """
    if amp in (False, "off", "false", "False", None):
        return None
    dev = torch.device(device)
    if amp == "auto" and dev.type == "cpu" and not cpu_has_fast_bf16():
        return None
    if dtype is None:
        return torch.float16 if dev.type == "cuda" else torch.bfloat16
    resolved = _DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.bfloat16, torch.float16):
        msg = f"amp dtype {dtype!r} not supported; use 'bf16' or 'fp16'"
        raise ValueError(msg)
    if dev.type == "cpu" and resolved is torch.float16:
        msg = "fp16 autocast is not supported on CPU; use amp_dtype 'bf16'"
        raise ValueError(msg)
    return resolved


def autocast_for(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on the device's own type, or a null context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
