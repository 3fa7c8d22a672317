"""The integrations for real: the examples train tiny models, on one or two CPU processes, and the
viewer core reads the runs back. A real Trainer with a poisoned batch shows its NaN."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lmtop import hooks
from lmtop.hooks import schema
from lmtop.tui.follow import Follower
from lmtop.tui.runbook import RunView

EXAMPLES = Path(__file__).parents[1] / "examples"
EXAMPLE_TIMEOUT = 150  # seconds per try; a 2-rank example takes 10-40 s
sys.path.insert(0, str(EXAMPLES))  # the examples' shared _tiny module, imported where needed


def run_example(script: str, *args: str, processes: int = 1) -> subprocess.CompletedProcess[str]:
    """Runs ``examples/<script>`` as a user would: python, or accelerate launch on CPU ranks.

    Several CPU ranks get a second try after a timeout. torch's gloo backend deadlocks at exit now
    and then (about once in 20 runs on a loaded 2-core machine): freeing the DDP model joins
    gloo's worker threads with the GIL held while a worker waits for the GIL to free the last
    all-reduce's tensors (pytorch/pytorch#56297; py-spy shows lmtop's thread idle). The hung
    launch is killed with every rank, and its runs are removed before the second try.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, str(EXAMPLES / script), *args]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        command[1:1] = [
            "-m",
            "accelerate.commands.accelerate_cli",
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--main_process_port",
            "0",
        ]
    for attempt in range(2 if processes > 1 else 1):
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            stdout, stderr = process.communicate(timeout=EXAMPLE_TIMEOUT)
            break
        except subprocess.TimeoutExpired:
            for pid in [process.pid, *descendants(process.pid)]:  # ranks have their own sessions
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            process.communicate()
            if attempt or processes == 1:
                raise
            runs = Path(env.get("LMTOP_DIR", "lmtop_runs"))
            shutil.rmtree(runs, ignore_errors=True)
    assert process.returncode == 0, stderr[-4000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc (children before their children)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(0), [])
        found += children
        queue += children
    return found


def read_run(folder: str) -> tuple[RunView, list[schema.Message]]:
    """The one run under ``folder``, read by the viewer core, and all its messages."""
    follower = Follower([folder], follow=False, live=False)
    messages: list[schema.Message] = []
    for _ in range(50):
        messages += [m for _, m in follower.poll(0)]
        if follower.done:
            break
    assert len(follower.runs) == 1, list(follower.runs)
    (run,) = follower.book.snapshot()
    return run, messages


def steps_with(messages: list[schema.Message], rank: int, key: str) -> dict[int, dict[str, Any]]:
    """Rank ``rank``'s metrics that hold ``key``, by step; fails if a step has two."""
    out: dict[int, dict[str, Any]] = {}
    for message in messages:
        if message.rank == rank and message.kind == "metrics" and key in message.m:
            assert message.step is not None and message.step not in out, message.step
            out[message.step] = message.m
    return out


def events(messages: list[schema.Message], rank: int) -> list[str]:
    return [m.data["text"] for m in messages if m.rank == rank and m.kind == "event"]


def assert_warmup_cosine(records: dict[int, dict[str, Any]], peak: float, warmup: int) -> None:
    """Step k (from 1) trained at the schedule's rate for k-1 steps done: warm-up, then cosine."""
    from _tiny import warmup_cosine

    total = max(records)
    assert sorted(records) == list(range(1, total + 1))
    for step, m in records.items():
        expected = peak * warmup_cosine(step - 1, warmup, total)
        assert m["learning_rate"] == pytest.approx(expected, rel=1e-6, abs=1e-12), step
    rates = [records[k]["learning_rate"] for k in range(1, total + 1)]
    assert rates[0] == 0.0 and max(rates) == pytest.approx(peak, rel=0.05)
    assert rates.index(max(rates)) == warmup, "the peak comes at the end of the warm-up"


def test_plain_loop_trains_and_publishes_every_step(lmtop_env: dict[str, str]) -> None:
    run_example("plain_loop.py", "--steps", "30", "--warmup", "5", "--eval-every", "10")
    run, messages = read_run(lmtop_env["LMTOP_DIR"])
    assert run.state == "finished" and sorted(r.rank for r in run.ranks) == [0]
    assert run.config["total_steps"] == 30 and run.config["max_grad_norm"] == 1.0
    records = steps_with(messages, 0, "loss")
    assert_warmup_cosine(records, peak=3e-3, warmup=5)
    for m in records.values():
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-5)
        assert m["grad_norm"] > 0 and m["tokens_per_second"] > 0 and m["host_rss_gb"] > 0
    losses = [records[k]["loss"] for k in sorted(records)]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, "it trains"
    assert sorted(steps_with(messages, 0, "eval_loss")) == [10, 20, 30]
    assert events(messages, 0) == [f"evaluation: eval_loss {e}" for e in _evals(messages)]


def _evals(messages: list[schema.Message]) -> list[str]:
    return [f"{m.m['eval_loss']:.4g}" for m in messages if "eval_loss" in m.m]


@pytest.mark.slow
def test_trainer_lora_on_two_ranks_gives_the_viewer_everything(
    lmtop_env: dict[str, str], tmp_path: Path
) -> None:
    output = str(tmp_path / "checkpoints")
    run_example("trainer_lora.py", "--max-steps", "24", "--output-dir", output, processes=2)
    run, messages = read_run(lmtop_env["LMTOP_DIR"])
    assert run.state == "finished" and sorted(r.rank for r in run.ranks) == [0, 1]
    config = run.config
    assert config["peft"]["type"] == "LORA" and config["peft"]["r"] == 8
    assert 0 < config["trainable_params"] < config["total_params"]
    assert config["trainable_share"] == pytest.approx(
        config["trainable_params"] / config["total_params"]
    )
    assert config["total_steps"] == 24 and config["world_size"] == 2
    assert config["output_dir"] == output
    assert config["effective_batch_size"] == 16 * 2 * 2
    assert config["lr_scheduler_type"] == "cosine" and config["learning_rate"] == 1e-2
    for rank in (0, 1):
        assert run.rank(rank).info and run.rank(rank).info["config"] == config
        records = steps_with(messages, rank, "loss")  # one record per optimizer step
        assert_warmup_cosine(records, peak=1e-2, warmup=config["warmup_steps"])
        for step, m in records.items():
            assert {"grad_norm", "epoch", "perplexity", "step_time", "tokens_per_second"} <= set(m)
            assert m["micro_batches"] == 2, "gradient accumulation: two micro-batches a step"
            assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-5)
            assert m["epoch"] == pytest.approx(step * 64 / 4000, rel=1e-6)
        evals = steps_with(messages, rank, "eval_loss")
        assert sorted(evals) == [8, 16, 24]
        for m in evals.values():
            assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
        texts = events(messages, rank)
        assert sum(t.startswith("evaluation: eval_loss") for t in texts) == 3
        assert [t for t in texts if t.startswith("checkpoint saved")] == [
            f"checkpoint saved: {output}/checkpoint-{step} ({seconds:.2f} s)"
            for step, seconds in _checkpoint_seconds(messages, rank)
        ]
        assert [step for step, _ in _checkpoint_seconds(messages, rank)] == [12, 24]
        assert texts[-1] == "training ended"
    # Both ranks computed the same gradient (DDP), each on its own data.
    zero, one = steps_with(messages, 0, "loss"), steps_with(messages, 1, "loss")
    assert all(zero[k]["grad_norm"] == one[k]["grad_norm"] for k in zero)
    assert any(zero[k]["loss"] != one[k]["loss"] for k in zero)


def _checkpoint_seconds(messages: list[schema.Message], rank: int) -> list[tuple[int, float]]:
    return [
        (m.step or 0, m.data["data"]["seconds"])
        for m in messages
        if m.rank == rank and m.kind == "event" and "path" in m.data.get("data", {})
    ]


@pytest.mark.slow
def test_accelerate_loop_on_two_ranks_publishes_from_both(lmtop_env: dict[str, str]) -> None:
    run_example(
        "accelerate_loop.py", "--steps", "20", "--warmup", "4", "--eval-every", "10", processes=2
    )
    run, messages = read_run(lmtop_env["LMTOP_DIR"])
    assert run.state == "finished" and sorted(r.rank for r in run.ranks) == [0, 1]
    for rank in (0, 1):
        info = run.rank(rank).info or {}
        assert info["config"]["world_size"] == 2 and info["config"]["total_steps"] == 20
        records = steps_with(messages, rank, "loss")
        assert_warmup_cosine(records, peak=3e-3, warmup=4)
        assert all(m["micro_batches"] == 2 and m["grad_norm"] > 0 for m in records.values())
        assert sorted(steps_with(messages, rank, "eval_loss")) == [10, 20]
        assert run.rank(rank).status == "ok"


def test_trainer_publishes_a_nan_loss_at_its_step_despite_the_filter(
    lmtop_env: dict[str, str], tmp_path: Path, fresh_hooks: None
) -> None:
    import torch
    from _tiny import SPECIAL, ArithmeticDataset, build_model, build_tokenizer, collate, setup
    from lmtop.hooks import LmtopCallback
    from transformers import PrinterCallback, Trainer, TrainingArguments

    setup()
    tokenizer, model = build_tokenizer(), build_model(seed=0)
    poison = SPECIAL.index("[NAN]")
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = math.nan  # any batch holding it: NaN
    data = ArithmeticDataset(tokenizer, 64, seed=1)
    batch, accumulate, bad_step = 4, 2, 4
    item = data.items[(bad_step - 1) * batch * accumulate + 1]  # in step 4's first micro-batch
    item["input_ids"][3] = poison
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate,
        train_sampling_strategy="sequential",  # so the poisoned batch comes at a known step
        logging_steps=1,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    assert args.logging_nan_inf_filter, "left at its default"
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collate,
        callbacks=[LmtopCallback()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    hooks.finish()

    run, messages = read_run(lmtop_env["LMTOP_DIR"])
    published = {step: m["loss"] for step, m in steps_with(messages, 0, "loss").items()}
    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert sorted(published) == list(range(1, 7))
    assert math.isnan(published[bad_step]), "the run shows the NaN at the step it happened"
    assert math.isfinite(logged[bad_step]), "while the Trainer's own log hides it"
    for step in range(1, bad_step):
        assert published[step] == pytest.approx(logged[step], rel=1e-6), "the Trainer's loss"
    grad_norms = steps_with(messages, 0, "grad_norm")
    assert math.isnan(grad_norms[bad_step]["grad_norm"])
    assert run.config["logging_nan_inf_filter"] is True


def test_tracker_through_the_accelerator_on_one_process(
    lmtop_env: dict[str, str], fresh_hooks: None
) -> None:
    import torch
    from accelerate import Accelerator
    from lmtop.hooks import LmtopTracker
    from lmtop.hooks.accelerate import init_every_rank, log_every_rank

    tracker = LmtopTracker()
    accelerator = Accelerator(log_with=tracker, cpu=True)
    init_every_rank(accelerator, "tiny", config={"learning_rate": 0.1, "scheduler": "cosine"})
    assert accelerator.get_tracker("lmtop").tracker is hooks.current()
    for step in range(3):
        log_every_rank(accelerator, {"loss": torch.tensor(1 / (step + 1)), "tag": "x"}, step=step)
    accelerator.log({"eval_loss": 0.25}, step=2)
    accelerator.end_training()

    run, messages = read_run(lmtop_env["LMTOP_DIR"])
    assert run.state == "finished"
    assert run.config == {"learning_rate": 0.1, "scheduler": "cosine"}
    metrics = [(m.step, m.m) for m in messages if m.kind == "metrics"]
    assert metrics == [
        (0, {"loss": 1.0}),
        (1, {"loss": 0.5}),
        (2, {"loss": pytest.approx(1 / 3)}),
        (2, {"eval_loss": 0.25}),
    ], "each value once; text values are left out"


def test_an_evaluation_before_training_joins_its_run_and_a_second_train_gets_its_own(
    lmtop_env: dict[str, str], tmp_path: Path, fresh_hooks: None
) -> None:
    from _tiny import ArithmeticDataset, build_model, build_tokenizer, collate, setup
    from lmtop.hooks import LmtopCallback
    from transformers import PrinterCallback, Trainer, TrainingArguments

    setup()
    tokenizer = build_tokenizer()
    trainer = Trainer(
        model=build_model(seed=0),
        args=TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=3,
            per_device_train_batch_size=8,
            logging_steps=500,  # the default: the Trainer would log no step of these
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        ),
        train_dataset=ArithmeticDataset(tokenizer, 64, seed=1),
        eval_dataset=ArithmeticDataset(tokenizer, 16, seed=2),
        data_collator=collate,
        callbacks=[LmtopCallback(log_every_step=True)],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.evaluate()  # the baseline, before any training
    trainer.train()
    trainer.train()  # again, from the start: another run
    hooks.finish()

    follower = Follower([lmtop_env["LMTOP_DIR"]], follow=False, live=False)
    messages: list[schema.Message] = []
    while not follower.done:
        messages += [m for _, m in follower.poll(0)]
    first, second = sorted(follower.book.snapshot(), key=lambda run: run.name)
    assert first.config["model_class"] == "LlamaForCausalLM"
    assert second.config["total_steps"] == 3
    by_run = {run.name: [m for m in messages if m.run == run.name] for run in (first, second)}
    baseline = steps_with(by_run[first.name], 0, "eval_loss")
    assert list(baseline) == [0] and "eval_perplexity" in baseline[0]
    for run in (first, second):
        records = steps_with(by_run[run.name], 0, "loss")
        assert sorted(records) == [1, 2, 3]
        assert all(m["grad_norm"] > 0 for m in records.values()), "log_every_step"
        assert run.state == "finished"
    texts = events(by_run[first.name], 0)
    assert texts[0].startswith("evaluation") and "training begins" in texts
