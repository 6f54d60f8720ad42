"""The one place that decides device, dtype and autocast for inference and training."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from retrieval.errors import RetrieveError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs; built once by `resolve_runtime` and passed down."""

    device: torch.device
    # Autocast dtype, or None for plain float32. Features are always returned as float32.
    autocast_dtype: torch.dtype | None
    channels_last: bool

    @property
    def is_gpu(self) -> bool:
        return self.device.type in ("cuda", "mps")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        name = self.device.type
        if self.device.type == "cuda":
            name = f"cuda ({torch.cuda.get_device_name(self.device)})"
        dtype = "float32" if self.autocast_dtype is None else str(self.autocast_dtype).split(".")[-1]
        fmt = ", channels_last" if self.channels_last else ""
        return f"{name}, {dtype}{fmt}"


def pick_device(device: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU for `auto`; an explicit device that is missing is an error."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise RetrieveError(f"Unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if has_mps else torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RetrieveError("«device» cuda was asked for but no CUDA GPU is visible; use «device» auto.")
    if device == "mps" and not has_mps:
        raise RetrieveError("«device» mps was asked for but MPS is not available; use «device» auto.")
    return torch.device(device)


def resolve_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """Turn user-facing `device`/`dtype` strings into a Runtime.

    `auto` dtype: bf16 autocast on CUDA GPUs that support it (fp16 otherwise, and on MPS). On CPU,
    bf16 autocast with channels_last where the CPU has native bf16 instructions (AVX-512 BF16 or
    AMX): measured 2.7x faster than float32 for resnet18 on 2 EPYC cores (bench/RESULTS.md);
    elsewhere bf16 is emulated and slower, so float32.
    """
    if dtype not in DTYPES:
        raise RetrieveError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    dev = pick_device(device)
    if dtype == "auto":
        if dev.type == "cuda":
            autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif dev.type == "mps":
            autocast = torch.float16
        else:
            autocast = torch.bfloat16 if cpu_has_native_bf16() else None
    else:
        autocast = None if dtype == "float32" else getattr(torch, dtype)
    # channels_last helps cuDNN tensor-core convolutions and oneDNN on CPU (measured 1.4x in fp32,
    # 1.5x in bf16 for resnet18 on EPYC); MPS gains nothing from it.
    return Runtime(device=dev, autocast_dtype=autocast, channels_last=dev.type in ("cuda", "cpu"))


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bf16 dot products natively (Linux: avx512_bf16 or amx_bf16 flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def machine_summary() -> str:
    """One line naming date, CPU, cores, GPU and versions: the header every benchmark prints."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{time.strftime('%Y-%m-%d')} | {cpu} | {len(os.sched_getaffinity(0))} cores, "
        f"{torch.get_num_threads()} torch threads | {gpu} | torch {torch.__version__} | "
        f"python {platform.python_version()}"
    )
