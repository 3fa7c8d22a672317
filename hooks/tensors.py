"""Torch values in ``publish`` without a host–device synchronisation, and torch helpers.

Reading a CUDA tensor with ``.item()`` or ``float()`` makes the host wait until the GPU has caught
up with everything queued before it: a training loop that logs every step that way loses the
overlap of host and device. :class:`Transfer` instead stacks the CUDA values of one message into
one small tensor on the device, queues a ``non_blocking`` copy into pinned host memory and records
a CUDA event behind it. The publisher keeps the message in line, asks ``event.query()`` (which
never blocks) at its next call, and writes the message, with its ``seq``, once the values are on
the host. CPU tensors need no copy and are read directly.

:func:`learning_rates` and :func:`device_memory` give the learning rate(s) of an optimizer and the
memory figures without synchronising either: a learning rate kept as a CUDA tensor (capturable
optimizers) travels as a tensor, and the CUDA memory figures are the caching allocator's host-side
counters.

Nothing here imports torch: it is used only when the caller already has (``sys.modules``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import schema

GB = 1e9  # memory figures are in GB (10^9 bytes), as nvidia-smi's "GB" and the viewer's chart say


def device_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor on a CUDA device (reading it directly would sync)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor) and value.is_cuda


class Transfer:
    """The values of some one-element CUDA tensors on their way into pinned host memory."""

    __slots__ = ("_parts",)

    def __init__(self, values: Sequence[tuple[str, Any]]) -> None:
        """Queues the copies on each tensor's current stream; raises if CUDA refuses."""
        torch = sys.modules["torch"]
        groups: dict[tuple[Any, bool], list[tuple[str, Any]]] = {}
        for name, tensor in values:
            exact = not (tensor.is_floating_point() or tensor.is_complex())
            groups.setdefault((tensor.device, exact), []).append((name, tensor))
        # One stacked tensor, one copy and one event per device and kind of number: a message of
        # eight CUDA scalars costs a handful of kernel launches, not eight synchronisations.
        self._parts: list[tuple[list[str], bool, Any, Any]] = []
        with torch.no_grad():
            for (device, exact), items in groups.items():
                dtype = torch.int64 if exact else torch.float64
                stacked = torch.stack([t.detach().reshape(()) for _, t in items]).to(dtype)
                host = torch.empty(stacked.shape, dtype=dtype, pin_memory=True)
                host.copy_(stacked, non_blocking=True)
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(device))
                self._parts.append(([name for name, _ in items], exact, host, done))

    def ready(self) -> bool:
        """Whether every copy has landed; never blocks."""
        return all(done.query() for _, _, _, done in self._parts)

    def wait(self, timeout: float) -> bool:
        """Polls until the copies have landed or ``timeout`` seconds passed; True when landed."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.0005)
        return True

    def values(self) -> dict[str, int | float | str]:
        """The values by metric name, as the wire holds them (call once :meth:`ready`)."""
        out: dict[str, int | float | str] = {}
        for names, exact, host, _ in self._parts:
            numbers = host.tolist()
            for name, value in zip(names, numbers, strict=True):
                out[name] = value if exact else schema.finite_or_token(value)
        return out


def learning_rates(optimizer: Any, name: str = "learning_rate") -> dict[str, Any]:
    """The learning rate(s) of a torch optimizer's param groups, ready for ``publish``.

    ``learning_rate`` is the first group's (as ``Trainer`` and ``get_last_lr()[0]`` report it);
    each other group whose rate differs adds ``learning_rate/<group>``, named by the group's
    ``"name"`` entry when it has one, else by its index. A rate held as a tensor (capturable
    optimizers) is passed on as it is, so a CUDA one is read without a synchronisation.
    """
    groups = [g for g in getattr(optimizer, "param_groups", None) or () if "lr" in g]
    if not groups:
        return {}
    first = groups[0]["lr"]
    rates = {name: first}
    for index, group in enumerate(groups[1:], 1):
        lr = group["lr"]
        if type(lr) is float and type(first) is float and lr == first:
            continue
        rates[f"{name}/{group.get('name', index)}"] = lr
    return rates


def device_memory(device: Any = None) -> dict[str, float]:
    """Memory figures in GB: the CUDA allocator's when CUDA is in use, else the host's RSS.

    With CUDA: ``gpu_memory_allocated_gb`` (live tensors), ``gpu_memory_reserved_gb`` (held by the
    caching allocator) and ``gpu_memory_peak_gb`` (the peak of allocated since the start or the
    last ``torch.cuda.reset_peak_memory_stats``). These are host-side counters: no synchronisation.
    Always: ``host_rss_gb``, this process's resident memory.
    """
    out: dict[str, float] = {}
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        if cuda is not None and cuda.is_initialized():
            out["gpu_memory_allocated_gb"] = cuda.memory_allocated(device) / GB
            out["gpu_memory_reserved_gb"] = cuda.memory_reserved(device) / GB
            out["gpu_memory_peak_gb"] = cuda.max_memory_allocated(device) / GB
    except Exception:  # a device that went away: report what can still be read
        pass
    rss = host_rss_bytes()
    if rss is not None:
        out["host_rss_gb"] = rss / GB
    return out


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_statm: tuple[int, int] | None = None  # (pid, fd): /proc/self names the process that opened it


def host_rss_bytes() -> int | None:
    """This process's resident set size, from ``/proc/self/statm`` (Linux), else None.

    The file stays open and is re-read with ``pread``: opening it costs more than reading it.
    """
    global _statm
    pid = os.getpid()
    try:
        if _statm is None or _statm[0] != pid:  # first call, or a forked child
            _statm = (pid, os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
        return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None
