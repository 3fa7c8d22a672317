"""The system panel: the host from /proc, GPUs through NVML, absent quietly without a driver.

NVML is the outside world (the NVIDIA driver): where a test needs GPUs, a stand-in module
answers NVML's calls as the driver would, a figure some boards do not support included. The
no-GPU path is this machine's real one.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lmtop.tui import frame
from lmtop.tui.app import LmtopApp
from lmtop.tui.follow import Follower
from lmtop.tui.frame import GIB
from lmtop.tui.system import Gpu, Sampler, SystemView
from lmtop.tui.widgets import SystemPanel
from runs import write_run
from test_app import shows


def fake_proc(folder: Path, busy: int, idle: int, total_kb: int, available_kb: int) -> Path:
    folder.mkdir(exist_ok=True)
    # user nice system idle iowait irq softirq steal: busy split over user and system.
    (folder / "stat").write_text(
        f"cpu  {busy // 2} 0 {busy - busy // 2} {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
    )
    (folder / "meminfo").write_text(
        f"MemTotal:       {total_kb} kB\nMemFree:        1 kB\nMemAvailable:   {available_kb} kB\n"
    )
    return folder


class FakeNvml:
    """NVML as a driver with ``count`` GPUs answers it; board 1 reports no power draw."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, count: int) -> None:
        self.count = count
        self.shut = False
        self.thread: threading.Thread | None = None

    def nvmlInit(self) -> None:
        self.thread = threading.current_thread()

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=90 + handle, memory=40)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=(60 + handle) * GIB, total=80 * GIB, free=0)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        if handle == 1:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 350_000  # milliwatts

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 60 + 4 * handle


def test_the_host_is_read_from_proc(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path / "proc", busy=1000, idle=3000, total_kb=24 << 20, available_kb=6 << 20
    )
    sampler = Sampler(proc=proc, nvml=FakeNvml(0))
    first = sampler.sample()
    assert first.cpu is None, "no busy share before a second reading"
    assert first.mem_total == 24 * GIB and first.mem_used == 18 * GIB
    fake_proc(proc, busy=1000 + 300, idle=3000 + 100, total_kb=24 << 20, available_kb=6 << 20)
    assert sampler.sample().cpu == 75.0  # 300 of 400 jiffies busy


def test_without_a_gpu_driver_the_gpu_part_is_absent_quietly(capsys) -> None:  # type: ignore[no-untyped-def]
    # This machine's own path: nvidia-ml-py is installed, no NVIDIA driver is.
    sampler = Sampler()
    sampler.sample()
    time.sleep(0.3)  # the kernel counts CPU time in ticks of 10 ms
    view = sampler.sample()
    sampler.close()
    assert view.gpus == ()
    assert view.cpu is not None and 0 <= view.cpu <= 100
    assert view.mem_total and view.mem_used and 0 < view.mem_used < view.mem_total
    text = frame.system_text(view, rows=6).plain
    assert text.startswith("cpu ") and "mem " in text and "gpu" not in text.lower()
    assert capsys.readouterr() == ("", "")


def test_each_gpu_gets_a_line_and_many_gpus_one_line_of_the_worst(tmp_path: Path) -> None:
    nvml = FakeNvml(2)
    view = Sampler(proc=tmp_path / "none", nvml=nvml).sample()  # type: ignore[arg-type]
    assert view.gpus[0] == Gpu(0, "NVIDIA H100 80GB HBM3", 90.0, 60 * GIB, 80 * GIB, 350.0, 60.0)
    assert view.gpus[1].power is None and view.gpus[1].util == 91.0, "an unsupported figure"
    assert view.cpu is None and view.mem_total is None  # no /proc there: not guessed
    lines = frame.system_text(view, rows=6).plain.splitlines()
    assert lines[1:] == ["gpu0  90% 60.0G/80.0G 350W 60°C", "gpu1  91% 61.0G/80.0G 64°C"]
    many = SystemView(cores=64, cpu=12.0, load=3.0, mem_used=GIB, mem_total=2 * GIB, gpus=tuple(
        Gpu(i, "H100", 90.0 + i, (70 + i) * GIB, 80 * GIB, 300.0, 60.0 + i) for i in range(8)
    ))  # fmt: skip
    lines = frame.system_text(many, rows=4).plain.splitlines()
    assert len(lines) == 3
    assert lines[2] == "8 GPUs util min 90% avg  94% max 77.0G/80.0G 2.4kW 67°C"


async def test_the_panel_shows_beside_the_ranks_where_there_is_room(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "runs", ranks=2, steps=50)
    proc = fake_proc(tmp_path / "proc", busy=10, idle=30, total_kb=16 << 20, available_kb=8 << 20)
    nvml = FakeNvml(2)
    source = Follower([str(run_dir)], follow=False, live=False)
    app = LmtopApp(source, refresh_hz=20, system=lambda: Sampler(proc=proc, nvml=nvml))  # type: ignore[arg-type]
    async with app.run_test(size=(160, 48)) as pilot:
        panel = app.query_one(SystemPanel)
        shown = await shows(pilot, panel, "gpu1", seconds=5)
        assert panel.display and "mem  8.0G/16.0G" in shown and "gpu0  90% 60.0G/80.0G" in shown
        await pilot.resize_terminal(120, 40)
        await pilot.pause(0.2)
        assert not panel.display, "at 120 columns the alerts keep the room"
        await pilot.resize_terminal(160, 48)
        await pilot.pause(0.2)
        assert panel.display
    deadline = time.monotonic() + 3
    while not nvml.shut and time.monotonic() < deadline:
        time.sleep(0.02)
    assert nvml.shut, "NVML let go when the app quits"
    assert nvml.thread not in (None, threading.main_thread()), "NVML kept off the UI thread"


async def test_without_a_sampler_there_is_no_panel(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "runs", ranks=1, steps=20)
    app = LmtopApp(Follower([str(run_dir)], follow=False, live=False), refresh_hz=20)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause(0.2)
        assert not app.query_one(SystemPanel).display
