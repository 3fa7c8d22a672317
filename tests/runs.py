"""Run directories built from fixed data, for the viewer's tests and snapshots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmtop.hooks import schema

T0 = 1_790_000_000.0


def line(
    run: str, rank: int, world: int, seq: int, kind: str, step: int | None, t: float, **fields: Any
) -> bytes:
    if isinstance(fields.get("m"), dict):  # NaN and infinities as the hook writes them
        fields["m"] = {
            k: schema.finite_or_token(v) if isinstance(v, float) else v
            for k, v in fields["m"].items()
        }
    return schema.encode(
        {
            "v": 1,
            "run": run,
            "rank": rank,
            "world": world,
            "seq": seq,
            "t": t,
            "kind": kind,
            "step": step,
            **fields,
        }
    )


def curve(step: int, steps: int, rank: int = 0) -> dict[str, float]:
    """A deterministic training curve: falling loss, warm-up and cosine lr, grad norm."""
    progress = step / steps
    wiggle = math.sin(step * 1.7 + rank) * 0.02
    warmup = max(1, steps // 10)
    lr = (
        3e-4 * (step + 1) / warmup
        if step < warmup
        else 3e-4 * 0.5 * (1 + math.cos(math.pi * progress))
    )
    return {
        "loss": 0.4 + 2.0 * math.exp(-3 * progress) + wiggle,
        "learning_rate": lr,
        "grad_norm": 0.4 + 0.3 * math.exp(-2 * progress) + wiggle,
        "tokens_per_second": 40_000.0 + 1000 * math.sin(step / 7) - 5000 * rank,
        "step_time": 0.2 + 0.05 * rank,
        "memory_gb": 30.0 + rank,
        "epoch": 2 * progress,
    }


def write_run(
    folder: Path,
    name: str = "fixed-run",
    ranks: int = 2,
    steps: int = 200,
    ended: bool = True,
    config: dict[str, Any] | None = None,
    extra: dict[int, dict[str, float]] | None = None,
    eval_every: int = 20,
    pid: int = 999_999_999,
    host: str = "gpu-box",
    events: dict[int, str] | None = None,
) -> Path:
    """Writes ``folder/name/rank-N.jsonl`` for a finished (or cut-off) run; returns its directory."""
    run_dir = folder / name
    run_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(ranks):
        seq = 0
        lines = [
            line(
                name,
                rank,
                ranks,
                seq,
                "start",
                None,
                T0,
                info={
                    "host": host,
                    "pid": pid,
                    "world": ranks,
                    "rank": rank,
                    "config": config or {"max_grad_norm": 1.0, "total_steps": steps},
                },
            )
        ]
        for step in range(steps):
            seq += 1
            metrics = curve(step, steps, rank)
            metrics.update((extra or {}).get(step, {}))
            lines.append(
                line(
                    name,
                    rank,
                    ranks,
                    seq,
                    "metrics",
                    step,
                    T0 + 1 + step * (0.2 + 0.05 * rank),
                    m=metrics,
                )
            )
            if events and step in events:  # every rank says it, as a Trainer's ranks do
                seq += 1
                t = T0 + 1 + step * (0.2 + 0.05 * rank)
                lines.append(line(name, rank, ranks, seq, "event", step, t, text=events[step]))
            if rank == 0 and eval_every and step % eval_every == eval_every - 1:
                seq += 1
                lines.append(
                    line(
                        name,
                        rank,
                        ranks,
                        seq,
                        "metrics",
                        step,
                        T0 + 1 + step * 0.2,
                        m={"eval_loss": 0.5 + 2.0 * math.exp(-3 * step / steps)},
                    )
                )
        if ended:
            seq += 1
            lines.append(
                line(
                    name,
                    rank,
                    ranks,
                    seq,
                    "end",
                    steps - 1,
                    T0 + 1 + steps * (0.2 + 0.05 * rank),
                    status="ok",
                )
            )
        (run_dir / f"rank-{rank}.jsonl").write_bytes(b"".join(lines))
    return run_dir
