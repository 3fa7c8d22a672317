"""Runs nobody instrumented: a Trainer's output directory opened with ``lmtop output_dir``.

A real ``transformers.Trainer`` trains a tiny Llama with the hook; its output directory, read
through ``trainer_state.json`` alone, must match the hook's own run point for point on loss.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from lmtop import hooks
from lmtop.hooks import schema
from lmtop.tui.follow import Follower
from lmtop.tui.runbook import RunView
from test_app import app_for, chart, loaded
from test_integrations import read_run, steps_with


def read_dir(path: Path, follower: Follower | None = None) -> tuple[RunView, list[schema.Message]]:
    """The one run ``lmtop PATH`` shows for ``path``, and every message it was given."""
    follower = follower or Follower([str(path)], follow=False, live=False)
    messages: list[schema.Message] = []
    for _ in range(50):
        messages += [m for _, m in follower.poll(0)]
        if follower.done:
            break
    (run,) = follower.book.snapshot()
    return run, messages


def train_tiny(out: Path, steps: int, **settings: object) -> object:
    """Trains a tiny Llama (1 layer, width 32) with the hook, logging every step; returns the
    Trainer. ``settings``: more TrainingArguments (evaluation, saving, reporting)."""
    from _tiny import ArithmeticDataset, build_model, build_tokenizer, collate, setup
    from lmtop.hooks import LmtopCallback
    from transformers import PrinterCallback, Trainer, TrainingArguments

    setup()
    tokenizer, model = build_tokenizer(), build_model(seed=0, layers=1, hidden=32)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=4,
        learning_rate=1e-3,
        use_cpu=True,
        disable_tqdm=True,
        **settings,  # type: ignore[arg-type]
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ArithmeticDataset(tokenizer, 64, seed=1),
        eval_dataset=ArithmeticDataset(tokenizer, 16, seed=2),
        data_collator=collate,
        callbacks=[LmtopCallback()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    hooks.finish()
    return trainer


def test_a_trainer_output_dir_matches_the_hooks_own_run_point_for_point(
    lmtop_env: dict[str, str], tmp_path: Path, fresh_hooks: None
) -> None:
    out = tmp_path / "out"
    trainer: Any = train_tiny(
        out,
        12,
        save_strategy="steps",
        save_steps=4,
        metric_for_best_model="eval_loss",
        report_to=[],
    )

    _, hooked = read_run(lmtop_env["LMTOP_DIR"])
    follower = Follower([str(out)], follow=True, live=False)
    run, read = read_dir(out, follower)
    assert run.name == "out" and run.dir == out.resolve()
    # Loss, point for point: every step the hook published, the same value, from the file alone.
    hook_loss = {s: m["loss"] for s, m in steps_with(hooked, 0, "loss").items()}
    file_loss = {s: m["loss"] for s, m in steps_with(read, 0, "loss").items()}
    assert sorted(file_loss) == sorted(hook_loss) == list(range(1, 13))
    for step, loss in hook_loss.items():
        assert file_loss[step] == pytest.approx(loss, rel=1e-6), step
    # Evaluations and the learning rate and grad norm the Trainer logged, at their steps.
    file_eval = {s: m["eval_loss"] for s, m in steps_with(read, 0, "eval_loss").items()}
    hook_eval = {s: m["eval_loss"] for s, m in steps_with(hooked, 0, "eval_loss").items()}
    assert sorted(file_eval) == [4, 8, 12] and file_eval == pytest.approx(hook_eval, rel=1e-6)
    assert set(steps_with(read, 0, "grad_norm")) == set(range(1, 13))
    texts = [m.data["text"] for m in read if m.kind == "event"]
    assert [t for t in texts if t.startswith("checkpoint saved")] == [
        "checkpoint saved: checkpoint-4",
        "checkpoint saved: checkpoint-8",
        "checkpoint saved: checkpoint-12",
    ]
    assert any(t.startswith("best checkpoint: checkpoint-") for t in texts)
    assert run.config.get("total_steps") == 12
    # The checkpoints hold no end-of-training summary: the run is not over yet as far as they
    # tell. save_state() writes it; the follower reads it and the run ends, nothing repeated.
    assert not [m for m in read if m.kind == "end"]
    time.sleep(0.01)
    trainer.save_state()
    later: list[schema.Message] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(m.kind == "end" for m in later):
        later += [m for _, m in follower.poll(0.1)]
    assert [m.kind for m in later] == ["event", "end"]
    assert later[0].data["text"] == "training ended" and "train_loss" in later[0].data["data"]
    assert follower.book.snapshot()[0].state == "finished"


def state(history: list[dict[str, float]], **extra: object) -> str:
    return json.dumps({"log_history": history, "global_step": len(history), **extra})


def test_a_growing_state_file_is_followed_and_nan_survives(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    steps = [{"loss": 2.0 - 0.1 * s, "learning_rate": 3e-4, "step": s} for s in range(1, 3)]
    (out / "checkpoint-2" / "trainer_state.json").write_text(state(steps))
    follower = Follower([str(out)], follow=True, live=False)
    _, first = read_dir(out, follower)
    assert sorted(steps_with(first, 0, "loss")) == [1, 2]
    (out / "checkpoint-4").mkdir()
    steps += [{"loss": math.nan, "step": 3}, {"loss": 1.5, "eval_loss": 1.7, "step": 4}]
    text = state(steps)  # Python's json writes NaN, as the Trainer does
    (out / "checkpoint-4" / "trainer_state.json").write_text(text)
    time.sleep(1.2)  # the follower's folder scan
    later: list[schema.Message] = []
    for _ in range(30):
        later += [m for _, m in follower.poll(0.1)]
    loss = steps_with(later, 0, "loss")
    assert sorted(loss) == [3, 4] and math.isnan(loss[3]["loss"]), "only what is new, NaN kept"
    assert steps_with(later, 0, "eval_loss")[4]["eval_loss"] == 1.7


def test_a_half_written_state_file_is_read_once_it_is_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "trainer_state.json").write_text('{"log_history": [{"loss": 1.0, "st')
    follower = Follower([str(out)], follow=True, live=False)
    assert not [m for _, m in follower.poll(0)]
    time.sleep(0.01)
    (out / "trainer_state.json").write_text(state([{"loss": 1.0, "step": 1}]))
    got: list[schema.Message] = []
    for _ in range(30):
        got += [m for _, m in follower.poll(0.1)]
        if got:
            break
    assert [m.m.get("loss") for m in got if m.kind == "metrics"] == [1.0]


async def test_the_viewer_draws_a_trainer_dir_like_any_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-40").mkdir(parents=True)
    history = [{"loss": 3 * math.exp(-s / 10), "grad_norm": 1.0, "step": s} for s in range(1, 41)]
    history += [{"eval_loss": 3 * math.exp(-s / 12), "step": s} for s in (10, 20, 30, 40)]
    history.sort(key=lambda e: e["step"])
    (out / "checkpoint-40" / "trainer_state.json").write_text(state(history, max_steps=40))
    app = app_for(out)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(app, pilot, 40 * 2 + 4)
        loss = chart(app, "loss").picture
        assert loss is not None and {line.label for line in loss.lines} >= {"train", "eval"}
        header = str(app.query_one("#header").render())
        assert "out" in header and "step 40/40" in header


def test_a_trainer_logged_for_tensorboard_alone_matches_the_hooks_run(
    lmtop_env: dict[str, str], tmp_path: Path, fresh_hooks: None
) -> None:
    pytest.importorskip("tensorboard", reason="the optional extra lmtop[tensorboard]")
    out = tmp_path / "tb-out"
    # No checkpoint, so no trainer_state.json: the event files alone.
    train_tiny(out, 8, save_strategy="no", report_to=["tensorboard"])

    _, hooked = read_run(lmtop_env["LMTOP_DIR"])
    run, read = read_dir(out)
    assert run.name == "tb-out"
    hook_loss = {s: m["loss"] for s, m in steps_with(hooked, 0, "loss").items()}
    file_loss = {s: m["train/loss"] for s, m in steps_with(read, 0, "train/loss").items()}
    assert sorted(file_loss) == sorted(hook_loss) == list(range(1, 9))
    for step, loss in hook_loss.items():
        # TensorBoard stores float32: the same loss to its 7 significant digits.
        assert file_loss[step] == pytest.approx(loss, rel=1e-6), step
    assert sorted(steps_with(read, 0, "eval/loss")) == [4, 8]
    times = [m.t for m in read if m.kind == "metrics"]
    assert times == sorted(times) and times[-1] - times[0] < 600, "the events' own wall times"
