"""Where and how training runs, decided once: device, precision, memory format, loss scaler, DDP rank, progress.

A `Runtime` is built once per run (`Runtime.create(params)`) and handed to the epoch loop and evaluation, so
the device, autocast dtype, channels_last flag and scaler do not travel as separate arguments into every call.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot start or go on (bad data split, run folder in use, ...)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (world_size 1 = not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when running under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and shows progress."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) of this process."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def raise_everywhere(self, message: str | None) -> None:
        """Raise the same TrainingError on every rank when rank 0 failed to prepare something."""
        if not self.enabled:
            if message:
                raise TrainingError(message)
            return
        box = [message]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise TrainingError(box[0])


def resolve_device(name: str, info: DistInfo = DistInfo()) -> torch.device:
    """'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' -> a device that exists here (the rank's GPU under torchrun).

    Any other name is a ParamError naming the parameter (params.check_device), whoever calls this."""
    from tongue_nb.train.params import check_device

    check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"parameter device: {name!r} asked for but CUDA is not available; use device=cpu")
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("parameter device: 'mps' asked for but not available; use device=cpu")
    return device


def resolve_amp(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for a precision setting, or None for fp32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        # bf16 needs no loss scaling and keeps fp32's range: the safe fast default on recent GPUs.
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise TrainingError(f"parameter precision: fp16 needs a CUDA device (got {device}); use bf16 or fp32")
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainingError("parameter precision: this GPU has no bf16 support; use fp16 or fp32")
        if device.type == "cpu" and cpu_has_native_bf16() is False:
            log.warning("precision bf16 on a CPU without AVX512-BF16/AMX: it is emulated and usually slower than fp32")
        return torch.bfloat16
    raise TrainingError(f"parameter precision: unknown value {precision!r}")


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16 flags); None where it cannot tell."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return None  # not an x86 Linux cpuinfo (ARM lists "Features"): do not guess
    return "avx512_bf16" in flags or "amx_bf16" in flags


# glibc's mallopt parameters (malloc.h) and the values a training process wants on the host.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 2**20      # glibc's largest: blocks up to 32 MiB come from the heap, not fresh mmaps
_TRIM_THRESHOLD = 2**31 - 1       # keep freed heap memory for the next step instead of handing it back
_allocator_tuned: bool | None = None


def tune_host_allocator() -> bool:
    """Keep glibc malloc from returning freed memory to the OS between training steps; True when applied.

    By default glibc serves large blocks (activations, gradients, batches) with fresh mmaps and trims freed heap
    memory, so every step page-faults its working set back in. On this project's 2-core CPU that cost a
    convnext_atto training step 10-20% against the model-only bound (bench/RESULTS.md); with the thresholds
    fixed the step reuses its memory. Applied once per process, on Linux with glibc; left alone when the user
    set MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ (their choice wins) or another allocator is preloaded.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or \
            any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                   _TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    _allocator_tuned = bool(ok)
    if ok:
        log.debug("host allocator: glibc mmap threshold %d MiB, no trimming between steps", _MMAP_THRESHOLD >> 20)
    return _allocator_tuned


def progress_allowed() -> bool:
    """Whether progress bars can be drawn: a terminal, or a kernel started by Jupyter (not papermill, not a pipe)."""
    # jupyter_server sets JPY_SESSION_NAME for the kernels it starts; papermill's kernels and
    # redirected output have neither it nor a TTY, and a bar there would flood the saved output.
    return "JPY_SESSION_NAME" in os.environ or bool(getattr(sys.stderr, "isatty", lambda: False)())


def is_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error (only the CUDA caching allocator raises this type; CPU failures are not retried)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory of this run so far and what it measures (CUDA allocator peak, or the process's peak RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss / 2**20 if platform.system() == "Darwin" else rss / 1024), "process_peak_rss"


@dataclass
class Runtime:
    """Device, autocast dtype, memory format, loss scaler, DDP position and progress of one run."""

    device: torch.device = torch.device("cpu")
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = None
    dist: DistInfo = DistInfo()
    progress: bool = False

    @classmethod
    def create(cls, params: Any, info: DistInfo | None = None) -> "Runtime":
        """The runtime a TrainParams asks for, on this machine (also sets threads and cuDNN autotuning)."""
        info = info or DistInfo.from_env()
        tune_host_allocator()
        if getattr(params, "num_threads", 0):
            torch.set_num_threads(params.num_threads)
        device = resolve_device(params.device, info)
        if device.type == "cuda":
            # Fixed input sizes: let cuDNN pick its fastest convolution algorithms once, on the first batches.
            torch.backends.cudnn.benchmark = True
        amp = resolve_amp(params.precision, device)
        if getattr(params, "compile", False) and device.type != "cuda":
            raise TrainingError(f"parameter compile: torch.compile is applied on a CUDA device only (got {device}); "
                                "set compile=false here")
        return cls(device=device, amp_dtype=amp, channels_last=bool(params.channels_last),
                   scaler=torch.amp.GradScaler("cuda") if amp == torch.float16 else None, dist=info,
                   progress=bool(getattr(params, "progress", False)) and info.is_main and progress_allowed())

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward pass (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch on the device (non-blocking from pinned memory), in the run's memory format."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def tensors(self, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in d.items()}

    @property
    def precision(self) -> str:
        """'fp32', 'bfloat16' or 'float16' (summary.json)."""
        return "fp32" if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", "")

    def describe_device(self) -> str:
        return str(self.device) if not self.dist.enabled else f"{self.device.type} x{self.dist.world_size}"
