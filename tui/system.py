"""The machine the viewer runs on: host CPU and memory, and each GPU through NVML.

Sampled by the viewer, once a second, never by the training process: reading ``/proc`` and
NVML costs the job nothing. The host's figures come from ``/proc/stat`` and ``/proc/meminfo``
(Linux; elsewhere the load average and the core count). GPUs come from NVML through
``nvidia-ml-py`` (``pynvml``), as nvidia-smi and nvitop read them; on a machine without an
NVIDIA driver the GPU part is absent, quietly. A figure NVML will not give (power on some
boards, a GPU that fell off the bus) is left out, not guessed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

SAMPLE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU at one moment; a figure NVML did not give is None."""

    index: int
    name: str
    util: float | None  # percent of the last sample period a kernel ran
    mem_used: float | None  # bytes
    mem_total: float | None
    power: float | None  # watts
    temp: float | None  # degrees Celsius


@dataclass(frozen=True, slots=True)
class SystemView:
    """The machine at one moment: what the system panel shows."""

    cores: int
    cpu: float | None  # percent of all cores busy since the last sample; None at the first
    load: float | None  # 1-minute load average
    mem_used: float | None  # bytes in use (total minus available)
    mem_total: float | None
    gpus: tuple[Gpu, ...] = ()


class Sampler:
    """Reads the host and its GPUs. Owned by one thread (the viewer's sampling worker).

    Args:
        proc: where ``/proc`` is (a test's folder of files).
        nvml: the ``pynvml`` module, or None to import it; without it, no GPUs.
    """

    def __init__(self, proc: Path = Path("/proc"), nvml: ModuleType | None = None) -> None:
        self.proc = proc
        self._ticks: tuple[int, int] | None = None  # (busy, total) jiffies at the last sample
        self._nvml = nvml if nvml is not None else _import_nvml()
        self._handles: list[Any] = []
        if self._nvml is not None:
            try:
                self._nvml.nvmlInit()
                count = self._nvml.nvmlDeviceGetCount()
                self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            except Exception:  # no driver, no device: no GPU part, and nothing said
                self._nvml, self._handles = None, []

    def sample(self) -> SystemView:
        """The machine now."""
        mem_used, mem_total = self._memory()
        try:
            load: float | None = os.getloadavg()[0]
        except OSError:
            load = None
        return SystemView(
            cores=os.cpu_count() or 1,
            cpu=self._cpu(),
            load=load,
            mem_used=mem_used,
            mem_total=mem_total,
            gpus=tuple(self._gpu(i, handle) for i, handle in enumerate(self._handles)),
        )

    def close(self) -> None:
        """Lets go of NVML."""
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml, self._handles = None, []

    def _cpu(self) -> float | None:
        try:
            with open(self.proc / "stat", "rb") as file:
                fields = [int(v) for v in file.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal: idle and iowait are not busy.
        total = sum(fields)
        busy = total - fields[3] - (fields[4] if len(fields) > 4 else 0)
        last, self._ticks = self._ticks, (busy, total)
        if last is None or total <= last[1]:
            return None
        return 100.0 * max(0, busy - last[0]) / (total - last[1])

    def _memory(self) -> tuple[float | None, float | None]:
        values: dict[str, int] = {}
        try:
            with open(self.proc / "meminfo", "rb") as file:
                for line in file:
                    name, _, rest = line.partition(b":")
                    if name in (b"MemTotal", b"MemAvailable"):
                        values[name.decode()] = int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            return None, None
        total, available = values.get("MemTotal"), values.get("MemAvailable")
        if total is None or available is None:
            return None, total
        return float(total - available), float(total)

    def _gpu(self, index: int, handle: Any) -> Gpu:
        nvml = self._nvml

        def read(call: str, *args: Any) -> Any:
            try:
                return getattr(nvml, call)(handle, *args)
            except Exception:  # this figure is not supported on this board, or the GPU is gone
                return None

        name = read("nvmlDeviceGetName")
        util = read("nvmlDeviceGetUtilizationRates")
        memory = read("nvmlDeviceGetMemoryInfo")
        power = read("nvmlDeviceGetPowerUsage")  # milliwatts
        temp = read("nvmlDeviceGetTemperature", getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
        return Gpu(
            index=index,
            name=name.decode() if isinstance(name, bytes) else str(name or "GPU"),
            util=None if util is None else float(util.gpu),
            mem_used=None if memory is None else float(memory.used),
            mem_total=None if memory is None else float(memory.total),
            power=None if power is None else power / 1000.0,
            temp=None if temp is None else float(temp),
        )


def _import_nvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml
