"""Tensors in publish(): CPU ones read directly, CUDA ones copied without a synchronisation and
written, in order and numbered, once they have landed. Helpers for learning rates and memory."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import torch
from lmtop import hooks
from lmtop.hooks import publisher as publisher_module
from lmtop.hooks import tensors


def lines(folder: str) -> list[dict[str, Any]]:
    (path,) = Path(folder).glob("*/rank-0.jsonl")
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_cpu_tensors_are_read_directly_with_exact_values(lmtop_env: dict[str, str]) -> None:
    hooks.init()
    hooks.publish(
        {
            "float32": torch.tensor(1.5),
            "bf16": torch.tensor(0.25, dtype=torch.bfloat16),
            "int": torch.tensor(7),
            "bool": torch.tensor(True),
            "nan": torch.tensor(math.nan),
            "inf": torch.tensor(-math.inf),
            "one_element": torch.ones(1, 1),
            "with_grad": torch.tensor(2.0, requires_grad=True) * 2,
            "vector": torch.ones(3),  # not a number: dropped and counted
        },
        step=3,
    )
    hooks.finish()
    _, message, end = lines(lmtop_env["LMTOP_DIR"])
    assert message["step"] == 3
    assert message["m"] == {
        "float32": 1.5,
        "bf16": 0.25,
        "int": 7,
        "bool": 1,
        "nan": "NaN",
        "inf": "-Infinity",
        "one_element": 1.0,
        "with_grad": 4.0,
    }
    assert end["problems"] == {"metrics that are not numbers dropped": 1}


def test_learning_rates_of_param_groups() -> None:
    weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    one = torch.optim.SGD(weights, lr=0.1)
    assert tensors.learning_rates(one) == {"learning_rate": 0.1}
    same = torch.optim.SGD([{"params": [w]} for w in weights], lr=0.1)
    assert tensors.learning_rates(same) == {"learning_rate": 0.1}  # decay / no-decay groups
    different = torch.optim.AdamW(
        [
            {"params": [weights[0]], "lr": 1e-3},
            {"params": [weights[1]], "lr": 1e-4, "name": "head"},
            {"params": [weights[2]], "lr": 1e-5},
        ]
    )
    assert tensors.learning_rates(different, name="lr") == {
        "lr": 1e-3,
        "lr/head": 1e-4,
        "lr/2": 1e-5,
    }
    scheduled = torch.optim.lr_scheduler.LambdaLR(one, lambda step: 0.5**step)
    one.step()
    scheduled.step()
    assert tensors.learning_rates(one) == {"learning_rate": 0.05}


def test_memory_without_cuda_is_the_host_rss() -> None:
    memory = tensors.device_memory()
    if not torch.cuda.is_initialized():
        assert set(memory) == {"host_rss_gb"}
    held = bytearray(200_000_000)  # resident once written
    held[::4096] = b"x" * len(held[::4096])
    assert tensors.device_memory()["host_rss_gb"] > memory["host_rss_gb"] + 0.15
    del held


class LateCopy:
    """Stands in for the GPU: a transfer whose values land when the test says so."""

    landed: bool = False

    def __init__(self, values: list[tuple[str, Any]]) -> None:
        self.names = [name for name, _ in values]
        self.numbers = [float(value.value) for _, value in values]

    def ready(self) -> bool:
        return LateCopy.landed

    def wait(self, timeout: float) -> bool:
        return LateCopy.landed

    def values(self) -> dict[str, float]:
        return dict(zip(self.names, self.numbers, strict=True))


class OnDevice:
    """A one-element 'device tensor' for the stand-in GPU."""

    def __init__(self, value: float) -> None:
        self.value = value

    def numel(self) -> int:
        return 1


def test_messages_wait_in_order_for_their_gpu_values_and_are_numbered_when_written(
    lmtop_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The GPU is simulated (this machine may have none); the publisher, queue and file are real.
    monkeypatch.setattr(tensors, "device_tensor", lambda value: isinstance(value, OnDevice))
    monkeypatch.setattr(tensors, "Transfer", LateCopy)
    monkeypatch.setattr(LateCopy, "landed", False)
    hooks.init()
    publisher = hooks.current()
    assert publisher is not None
    hooks.publish({"loss": OnDevice(2.5), "lr": 0.1, "nested": {"gn": OnDevice(0.5)}}, step=10)
    hooks.publish({"lr": 0.2})  # no GPU value, but must not overtake step 10
    hooks.event("checkpoint saved", step=11)
    assert publisher.queued == 3
    assert len(lines(lmtop_env["LMTOP_DIR"])) == 1  # the start only: nothing was waited for
    LateCopy.landed = True
    hooks.publish({"lr": 0.3})
    assert publisher.queued == 0
    hooks.finish()
    written = lines(lmtop_env["LMTOP_DIR"])
    assert [m["seq"] for m in written] == list(range(6))
    assert [(m["kind"], m["step"]) for m in written[1:]] == [
        ("metrics", 10),
        ("metrics", 11),
        ("event", 11),
        ("metrics", 12),
        ("end", 12),
    ]
    assert written[1]["m"] == {"loss": 2.5, "lr": 0.1, "nested/gn": 0.5}  # names keep their order
    assert list(written[1]["m"]) == ["loss", "lr", "nested/gn"]
    assert written[1]["t"] < written[4]["t"], "a message keeps the time it was published"


def test_finish_drops_values_that_never_land_and_says_so(
    lmtop_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tensors, "device_tensor", lambda value: isinstance(value, OnDevice))
    monkeypatch.setattr(tensors, "Transfer", LateCopy)
    monkeypatch.setattr(LateCopy, "landed", False)
    monkeypatch.setattr(publisher_module, "FINISH_TENSOR_TIMEOUT", 0.05)
    hooks.init()
    hooks.publish({"loss": OnDevice(1.0)}, step=1)
    hooks.publish({"lr": 0.1}, step=2)
    hooks.finish()
    written = lines(lmtop_env["LMTOP_DIR"])
    assert [m["kind"] for m in written] == ["start", "metrics", "end"]
    assert written[1]["m"] == {"lr": 0.1}
    assert written[2]["problems"] == {"metrics whose GPU values never landed dropped": 1}


def test_importing_the_tensor_helpers_does_not_import_torch() -> None:
    code = "import sys, lmtop.hooks, lmtop.hooks.tensors; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
def test_cuda_tensors_are_published_without_a_synchronisation(
    lmtop_env: dict[str, str],
) -> None:
    device = torch.device("cuda")
    weights = torch.randn(512, 512, device=device, requires_grad=True)
    # A capturable optimizer keeps its learning rate on the device.
    optimizer = SimpleNamespace(param_groups=[{"lr": torch.tensor(1e-3, device=device)}])
    hooks.init()
    publisher = hooks.current()
    assert publisher is not None
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(20):
            torch.cuda._sleep(5_000_000)  # keep the GPU busy: a sync would wait for this
            loss = (weights @ weights).square().mean()
            loss.backward()
            assert weights.grad is not None
            grad_norm = torch.linalg.vector_norm(weights.grad)
            with torch.no_grad():
                weights -= 1e-3 * weights.grad
            weights.grad = None
            count = (weights > 0).sum()
            hooks.publish(
                {
                    "loss": loss.detach(),
                    "grad_norm": grad_norm,
                    "positive": count,
                    "nan": loss.detach() * math.nan,
                    "plain": 0.5,
                    **tensors.learning_rates(optimizer),
                    **tensors.device_memory(),
                },
                step=step,
            )
            kept.append((loss.detach(), grad_norm, count))
        waiting = publisher.queued
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert waiting > 0, "the GPU was busy: messages should have waited for their values"
    torch.cuda.synchronize()
    expected = [(loss.item(), norm.item(), int(count.item())) for loss, norm, count in kept]
    hooks.finish()
    written = [m for m in lines(lmtop_env["LMTOP_DIR"]) if m["kind"] == "metrics"]
    assert [m["step"] for m in written] == list(range(20))
    for message, (loss_value, norm, count_value) in zip(written, expected, strict=True):
        m = message["m"]
        assert m["loss"] == loss_value
        assert m["grad_norm"] == norm
        assert m["positive"] == count_value and type(m["positive"]) is int
        assert m["nan"] == "NaN"
        assert m["plain"] == 0.5
        assert m["learning_rate"] == pytest.approx(1e-3)
        assert m["gpu_memory_allocated_gb"] > 0
