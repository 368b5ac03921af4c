"""Where and how training runs: device (auto / cpu / cuda / mps), mixed precision, memory
layout, data-loader workers, and distributed data parallel under ``torchrun``.

``resolve_runtime(RuntimeConfig(...))`` checks every switch against the machine (a clear
``RuntimeError`` otherwise), joins the process group when ``torchrun`` started this process
(gloo on CPU, NCCL on GPUs) and returns the ``Runtime`` the trainer uses; ``Runtime.record()``
is what the run stores about it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("off", "auto", "bf16", "fp16")  # auto: bf16 where the GPU supports it, else fp16
# A rank may wait this long for rank 0 to build a shared cache (an ensemble teacher's outputs
# take about an hour on 2 CPU cores); the default 30 minutes would abort such a run.
COLLECTIVE_TIMEOUT = dt.timedelta(hours=6)
T = TypeVar("T")


@dataclass(frozen=True)
class RuntimeConfig:
    """What the user asked for on the command line."""

    device: str = "auto"
    amp: str = "off"
    channels_last: bool = True
    pin_memory: bool | None = None  # None: on with CUDA
    workers: int = 0
    threads: int = 0  # CPU threads of this process; 0: PyTorch's default (one per core)


@dataclass(frozen=True)
class Runtime:
    """The resolved runtime of this process."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = True
    pin_memory: bool = False
    workers: int = 0
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def grad_scaling(self) -> bool:
        """fp16 needs a gradient scaler against underflow; bf16 has fp32's range."""
        return self.amp_dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def per_rank_batch(self, global_batch: int) -> int:
        """Each rank's share of the global batch (which the learning rate is set for)."""
        if global_batch % self.world_size:
            raise ValueError(
                f"batch_size {global_batch} is the global batch and must divide by the "
                f"{self.world_size} processes; choose a multiple of {self.world_size}"
            )
        return global_batch // self.world_size

    def record(self) -> dict[str, Any]:
        """What a run stores about where it ran."""
        return {
            "device": str(self.device),
            "amp": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "off"),
            "channels_last": self.channels_last,
            "pin_memory": self.pin_memory,
            "workers": self.workers,
            "world_size": self.world_size,
            "backend": dist.get_backend() if self.distributed else "",
        }


CPU = Runtime(torch.device("cpu"))


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA if present, else MPS, else CPU; an explicit device must exist."""
    if name not in DEVICES:
        raise RuntimeError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"--device cuda: no usable CUDA GPU (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}); use --device cpu or auto"
        )
    if name == "mps" and not mps_ok:
        raise RuntimeError("--device mps: Apple-silicon GPU (MPS) not available here; use --device cpu or auto")
    return torch.device(name)


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on ``device``; mixed precision is a CUDA feature here."""
    if mode not in AMP_MODES:
        raise RuntimeError(f"--amp must be one of {', '.join(AMP_MODES)}, got {mode!r}")
    if mode == "off":
        return None
    if device.type != "cuda":
        raise RuntimeError(
            f"--amp {mode} needs a CUDA device, but this run is on {device.type}; drop --amp "
            "(training in fp32) or run on a GPU with --device cuda"
        )
    bf16_ok = torch.cuda.is_bf16_supported()
    if mode == "bf16" and not bf16_ok:
        raise RuntimeError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use --amp fp16")
    return torch.bfloat16 if mode == "bf16" or (mode == "auto" and bf16_ok) else torch.float16


def resolve_runtime(cfg: RuntimeConfig, env: dict[str, str] | None = None) -> Runtime:
    """Check ``cfg`` against this machine; join the process group under ``torchrun``."""
    env = dict(os.environ) if env is None else env
    device = resolve_device(cfg.device)
    if cfg.workers < 0:
        raise RuntimeError(f"--workers must be >= 0, got {cfg.workers}")
    if cfg.threads < 0:
        raise RuntimeError(f"--threads must be >= 1 (or 0 for PyTorch's default), got {cfg.threads}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world_size, rank, local_rank = (int(env.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        elif device.type == "mps":
            raise RuntimeError("torchrun with --device mps is not supported by PyTorch; use cuda or cpu")
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    pin = device.type == "cuda" if cfg.pin_memory is None else cfg.pin_memory
    amp_dtype = resolve_amp(cfg.amp, device)
    return Runtime(device, amp_dtype, cfg.channels_last, pin, cfg.workers, rank, local_rank, world_size)


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def sum_across_ranks(runtime: Runtime, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (each rank gets the result)."""
    if not runtime.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device if runtime.device.type == "cuda" else None)
    dist.all_reduce(tensor)
    return tensor.tolist()


def from_main(runtime: Runtime, value: T) -> T:
    """Rank 0's ``value`` on every rank (e.g. its validation scores, so all ranks stop together)."""
    if not runtime.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(runtime: Runtime, work: Callable[[], T]) -> T:
    """Rank 0 runs ``work`` (e.g. builds and saves a cache) while the others wait; then they run
    it too, finding the cache made. Built once, shared by every rank."""
    if runtime.is_main:
        result = work()
        barrier(runtime)
        return result
    barrier(runtime)
    return work()


@contextlib.contextmanager
def runtime_for(cfg: RuntimeConfig) -> Iterator[Runtime]:
    """``resolve_runtime`` and, on leaving, the process group torn down (torchrun runs)."""
    runtime = resolve_runtime(cfg)
    try:
        yield runtime
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


def describe(runtime: Runtime, global_batch: int, lr: float) -> str:
    """The log line about devices, batch split and learning rate."""
    per_rank = runtime.per_rank_batch(global_batch)
    where = f"{runtime.world_size} x {runtime.device.type}" if runtime.distributed else str(runtime.device)
    amp = runtime.record()["amp"]
    return (
        f"runtime: {where}, amp {amp}, channels_last {runtime.channels_last}, workers {runtime.workers}, "
        f"CPU threads {torch.get_num_threads()}, "
        f"pin_memory {runtime.pin_memory}; global batch {global_batch} = {runtime.world_size} x {per_rank} "
        f"per process; lr {lr:g} as set (not rescaled: the global batch is the recipe's)"
    )
