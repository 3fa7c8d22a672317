"""``LmtopCallback``: a Hugging Face ``Trainer`` run in lmtop, from every rank, with one line.

    trainer = Trainer(model, args, ..., callbacks=[LmtopCallback()])

Every rank publishes its own run file; all ranks of one launch join one run. Published:

- **Each optimizer step** (one record per optimizer step, however many micro-batches it
  accumulated): ``loss`` (this rank's), ``perplexity`` (``exp(loss)``, for language models),
  ``learning_rate`` (the rate this step used; ``learning_rate/<group>`` for param groups whose
  rate differs), ``epoch``, ``micro_batches``, ``step_time`` (seconds, data loading included;
  evaluation and checkpoint time excluded), ``samples_per_second``, ``tokens_per_second``
  (non-padding tokens), memory (``gpu_memory_allocated_gb``, ``gpu_memory_reserved_gb``,
  ``gpu_memory_peak_gb`` under CUDA; ``host_rss_gb`` always) and, at the Trainer's logging steps,
  ``grad_norm`` (before clipping) and any other number the Trainer logs. The Trainer computes
  the gradient norm every step but shows it only in its logs: for ``grad_norm`` every step, set
  ``logging_steps=1`` or ``LmtopCallback(log_every_step=True)``.
- **Each evaluation**: every ``eval_*`` figure, ``eval_perplexity``, and an event.
- **At the start**: the run's ``config``: the training arguments that matter, the number of
  optimizer steps (``total_steps``, for an ETA), the model class, total and trainable parameter
  counts and, for PEFT models, the adapter (``peft``: type, r, alpha, dropout, target modules).
- **Events**: evaluation done, checkpoint saved (path and seconds taken), training ended.

**Honest NaN.** With ``logging_nan_inf_filter=True`` (the default), ``Trainer`` replaces a
micro-batch's NaN or infinite loss by the average of the losses before it, inside its training
loop and before the value reaches ``_tr_loss``, the only loss the callback API shows (through
``on_log``). So a broken run logs a clean curve. The callback reads the loss where it is born
instead: ``on_train_begin`` receives the model (``kwargs["model"]``), and a forward hook on it
keeps each training micro-batch's ``outputs.loss`` as a detached tensor, with no
synchronisation. At ``on_step_end`` the micro-batch losses are combined the way
``Trainer.training_step`` combines them (a mean, or a sum when the model already normalised by
the step's token count, ``num_items_in_batch``, times the number of processes when
``average_tokens_across_devices``), so on one process a finite step's ``loss`` equals what the
Trainer logs with ``logging_steps=1``, and a non-finite one is published as it is, at its step.
When the model returns no loss (a ``compute_loss_func``, label smoothing, a custom
``compute_loss``), the Trainer's logged loss is published instead, filter and all.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from . import current, event, init, publish, tensors

_F = TypeVar("_F", bound=Callable[..., Any])

# Model classes whose loss is a per-token cross-entropy, for which exp(loss) is the perplexity.
LANGUAGE_MODEL_SUFFIXES = (
    "ForCausalLM",
    "LMHeadModel",
    "ForMaskedLM",
    "ForConditionalGeneration",
    "ForSeq2SeqLM",
)
# Figures of the Trainer's end-of-training log; they go into the "training ended" event.
SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


def _safe(method: _F) -> _F:
    """Never lets a failure of lmtop stop the training: counts it and says it once."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            publisher = current()
            if publisher is not None:
                publisher.problems(f"LmtopCallback.{method.__name__} failed", repr(exc)[:200])
            else:
                print(f"lmtop: LmtopCallback.{method.__name__} failed: {exc!r}", file=sys.stderr)
            return None

    return cast(_F, wrapper)


def _number(value: Any) -> bool:
    return type(value) in (int, float) or (
        isinstance(value, (int, float)) and not isinstance(value, bool)
    )


class LmtopCallback(TrainerCallback):
    """Publishes a ``Trainer`` run to lmtop from every rank: steps, evaluations, config, events.

    Args:
        run: the run's name; default ``$LMTOP_RUN``, else one shared by all ranks of the launch.
        dir: the folder of runs; default ``$LMTOP_DIR``, else ``./lmtop_runs``.
        config: more hyper-parameters to record beside the ones read from the Trainer.
        perplexity: publish ``exp(loss)``; default: when the model is a language model.
        memory: publish memory figures each step.
        log_every_step: make the Trainer log every optimizer step, whatever ``logging_steps``
            says, so that ``grad_norm`` comes with every step. The console and the other
            reporting integrations then see every step too.
    """

    def __init__(
        self,
        run: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        config: Mapping[str, Any] | None = None,
        perplexity: bool | None = None,
        memory: bool = True,
        log_every_step: bool = False,
    ) -> None:
        self.run = run
        self.dir = dir
        self.config = dict(config or {})
        self.perplexity = perplexity
        self.memory = memory
        self.log_every_step = log_every_step
        self._own_run: str | None = None  # the run this callback started
        self._hook: Any = None
        self._mark = time.perf_counter()  # the end of the last step, log, evaluation or save
        self._pending: tuple[int, dict[str, Any]] | None = None  # a step record awaiting on_log
        self._summary: dict[str, Any] = {}
        self._trained = False  # a train() ended: the next one starts a new run
        self._raw_loss = False  # the forward hook has seen the model's loss
        self._own_rates = False  # learning rates read from the optimizer
        self._reset_step()

    def _reset_step(self) -> None:
        self._loss: torch.Tensor | None = None
        self._normalised = False  # the model divided by the step's token count
        self._micro = 0
        self._samples = 0
        self._tokens: torch.Tensor | int | None = None
        self._rates: dict[str, Any] = {}

    # -- the start ------------------------------------------------------------------------------

    @_safe
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        config = self._config(args, state, model)
        publisher = current()
        if publisher is None or (publisher.run == self._own_run and self._trained):
            # A first run, or another train() in the same process: a run of its own.
            self._own_run = init(run=self.run, config=config, dir=self.dir)
        else:  # a run already going (the script's, or one an evaluation before training began)
            event("training begins", step=state.global_step, data={"config": config})
        self._trained = False
        if self._hook is not None:
            self._hook.remove()
        if model is not None:
            self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self._reset_step()
        self._pending = None
        self._raw_loss = self._own_rates = False
        self._mark = time.perf_counter()

    def _config(
        self, args: TrainingArguments, state: TrainerState, model: torch.nn.Module | None
    ) -> dict[str, Any]:
        config = training_config(args, state, model)
        config.update(self.config)
        if self.perplexity is None and model is not None:
            self.perplexity = _is_language_model(model)
        return config

    def _ensure_run(self, args: TrainingArguments, state: TrainerState, kwargs: Any) -> None:
        """Starts the run, config and all, for an evaluation or a log outside of train()."""
        if current() is None:
            config = self._config(args, state, kwargs.get("model"))
            self._own_run = init(run=self.run, config=config, dir=self.dir)

    # -- each micro-batch and step --------------------------------------------------------------

    def _on_forward(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """Keeps a training micro-batch's loss and size, on the device, unsynchronised."""
        if not module.training:
            return  # evaluation and prediction
        try:
            self._micro += 1
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                self._samples += mask.shape[0]
                tokens: torch.Tensor | int = mask.sum()  # the tokens that are not padding
            else:
                ids = kwargs.get("input_ids", args[0] if args else None)
                if not isinstance(ids, torch.Tensor) or ids.dim() == 0:
                    ids = kwargs.get("inputs_embeds")
                if not isinstance(ids, torch.Tensor) or ids.dim() == 0:
                    tokens = 0
                else:
                    self._samples += ids.shape[0]
                    tokens = ids.shape[0] * ids.shape[1] if ids.dim() > 1 else ids.shape[0]
            self._tokens = tokens if self._tokens is None else self._tokens + tokens
            loss = getattr(output, "loss", None)
            if loss is None and isinstance(output, dict):
                loss = output.get("loss")
            if isinstance(loss, torch.Tensor):
                loss = loss.detach()
                if loss.dim():
                    loss = loss.mean()  # DataParallel: one loss per device
                self._loss = loss if self._loss is None else self._loss + loss
                self._normalised = kwargs.get("num_items_in_batch") is not None
        except Exception as exc:
            publisher = current()
            if publisher is not None:
                publisher.problems("LmtopCallback forward hook failed", repr(exc)[:200])

    @_safe
    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._publish_pending()

    @_safe
    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        # After optimizer.step() and before lr_scheduler.step(): the rate this step used.
        if optimizer is not None:
            self._rates = tensors.learning_rates(optimizer)

    @_safe
    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        now = time.perf_counter()
        seconds, self._mark = now - self._mark, now
        m: dict[str, Any] = {}
        loss = self._combined_loss(args)
        if loss is not None:
            self._raw_loss = True
            m["loss"] = loss
            if self.perplexity:
                m["perplexity"] = loss.float().exp()
        if self._rates:
            self._own_rates = True
            m.update(self._rates)
        if state.epoch is not None:
            m["epoch"] = state.epoch
        m["micro_batches"] = self._micro
        m["step_time"] = seconds
        if seconds > 0 and self._samples:
            m["samples_per_second"] = self._samples / seconds
            if self._tokens is not None:
                m["tokens_per_second"] = self._tokens / seconds
        if self.memory:
            m.update(tensors.device_memory())
        self._reset_step()
        if self.log_every_step:
            control.should_log = True
        # DefaultFlowCallback, which runs before us, has decided whether the Trainer logs this
        # step: if it does, wait for on_log's grad_norm and publish one record for the step.
        self._pending = (state.global_step, m)
        if not control.should_log:
            self._publish_pending()

    def _combined_loss(self, args: TrainingArguments) -> torch.Tensor | None:
        """This step's loss, combined over micro-batches as ``Trainer.training_step`` does."""
        loss = self._loss
        if loss is None or self._micro == 0:
            return None
        if self._normalised:
            # Each micro-batch loss is divided by the step's token count (all ranks' when the
            # Trainer averages tokens across devices, which then multiplies by the world size).
            world = getattr(args, "world_size", 1)
            if getattr(args, "average_tokens_across_devices", False) and world > 1:
                loss = loss * world
            return loss
        return loss / self._micro

    def _publish_pending(self) -> None:
        if self._pending is not None:
            step, m = self._pending
            self._pending = None
            publish(m, step=step)

    # -- logs, evaluations, checkpoints ---------------------------------------------------------

    @_safe
    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._mark = time.perf_counter()
        self._ensure_run(args, state, kwargs)
        logs = logs or {}
        if "train_runtime" in logs:  # the end-of-training summary: for the final event
            self._summary = {k: v for k, v in logs.items() if _number(v)}
            self._publish_pending()
            return
        pending = self._pending
        own = pending[1] if pending is not None and pending[0] == state.global_step else None
        extra: dict[str, Any] = {}
        for name, value in logs.items():
            if not _number(value) or name.startswith("eval_") or name == "epoch":
                continue  # eval_* come with on_evaluate
            if name == "loss" and self._raw_loss:
                continue  # the Trainer's is averaged over the logging window and NaN-filtered
            if name == "learning_rate" and self._own_rates:
                continue
            extra[name] = value
        if own is not None:
            own.update(extra)
            self._publish_pending()
        elif extra:
            self._publish_pending()
            publish(extra, step=state.global_step)

    @_safe
    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._publish_pending()
        self._ensure_run(args, state, kwargs)
        figures = {k: v for k, v in (metrics or {}).items() if _number(v) and k != "epoch"}
        eval_loss = figures.get("eval_loss")
        if self.perplexity and eval_loss is not None:
            figures["eval_perplexity"] = math.exp(eval_loss) if eval_loss < 709 else math.inf
        if figures:
            publish(figures, step=state.global_step)
        text = "evaluation"
        if eval_loss is not None:
            text += f": eval_loss {eval_loss:.4g}"
        event(text, step=state.global_step, data=figures)
        self._mark = time.perf_counter()

    @_safe
    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._publish_pending()
        self._ensure_run(args, state, kwargs)
        # No callback marks the start of a save: it follows the step's log and evaluation.
        seconds = time.perf_counter() - self._mark
        path = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
        event(
            f"checkpoint saved: {path} ({seconds:.2f} s)",
            step=state.global_step,
            data={"path": path, "seconds": seconds},
        )
        self._mark = time.perf_counter()

    @_safe
    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not control.should_log:
            self._publish_pending()

    @_safe
    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._publish_pending()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        data = {"global_step": state.global_step, **self._summary}
        if state.total_flos:
            data["total_flos"] = state.total_flos
        event("training ended", step=state.global_step, data=data)
        self._trained = True
        publisher = current()
        if publisher is not None:
            publisher.flush(timeout=0.5)  # values of the last steps still on their way


def _base_model(model: Any) -> Any:
    """The model under a PEFT adapter; the model itself otherwise."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _is_language_model(model: Any) -> bool:
    if model is None:
        return False
    return type(_base_model(model)).__name__.endswith(LANGUAGE_MODEL_SUFFIXES)


def _text(value: Any) -> Any:
    """An enum's value, a set as a sorted list; anything else as it is."""
    value = getattr(value, "value", value)
    if isinstance(value, (set, frozenset)):
        return sorted(str(v) for v in value)
    return value


def training_config(
    args: TrainingArguments, state: TrainerState, model: torch.nn.Module | None
) -> dict[str, Any]:
    """The hyper-parameters a viewer needs from a Trainer's arguments, state and model."""
    world = int(getattr(args, "world_size", 1) or 1)
    total_steps = int(state.max_steps or 0)
    config: dict[str, Any] = {
        "framework": "transformers.Trainer",
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": _text(args.lr_scheduler_type),
        "warmup_steps": args.get_warmup_steps(total_steps) if total_steps else args.warmup_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": world,
        "effective_batch_size": (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        ),
        "max_grad_norm": args.max_grad_norm,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "total_steps": total_steps,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "tf32": args.tf32,
        "seed": args.seed,
        "optim": _text(args.optim),
        "weight_decay": args.weight_decay,
        "logging_steps": args.logging_steps,
        "eval_strategy": _text(args.eval_strategy),
        "eval_steps": args.eval_steps,
        "save_strategy": _text(args.save_strategy),
        "save_steps": args.save_steps,
        "gradient_checkpointing": args.gradient_checkpointing,
        "logging_nan_inf_filter": args.logging_nan_inf_filter,
        "output_dir": str(args.output_dir),
    }
    if model is not None:
        config.update(model_config(model))
    return config


def model_config(model: torch.nn.Module) -> dict[str, Any]:
    """The model's class, parameter counts and, for a PEFT model, its adapter."""
    total = trainable = 0
    for parameter in model.parameters():
        count = int(getattr(parameter, "ds_numel", 0) or parameter.numel())  # DeepSpeed ZeRO-3
        total += count
        if parameter.requires_grad:
            trainable += count
    out: dict[str, Any] = {
        "model_class": type(model).__name__,
        "total_params": total,
        "trainable_params": trainable,
        "trainable_share": trainable / total if total else 0.0,
    }
    base = _base_model(model)
    if base is not model:
        out["base_model_class"] = type(base).__name__
    model_cfg = getattr(base, "config", None)
    if model_cfg is not None:
        for key in ("model_type", "_name_or_path", "hidden_size", "num_hidden_layers"):
            value = getattr(model_cfg, key, None)
            if value not in (None, ""):
                out["model_name" if key == "_name_or_path" else key] = value
    peft = peft_config(model)
    if peft:
        out["peft"] = peft
    return out


def peft_config(model: Any) -> dict[str, Any]:
    """The active adapter of a PEFT model: type, r, alpha, dropout, target modules."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or not configs:
        return {}
    name = getattr(model, "active_adapter", None)
    if not isinstance(name, str) or name not in configs:
        name = next(iter(configs))
    pc = configs[name]
    out: dict[str, Any] = {"adapter": name, "type": _text(getattr(pc, "peft_type", None))}
    for key, label in (
        ("r", "r"),
        ("lora_alpha", "alpha"),
        ("lora_dropout", "dropout"),
        ("target_modules", "target_modules"),
        ("modules_to_save", "modules_to_save"),
        ("task_type", "task_type"),
        ("use_rslora", "use_rslora"),
        ("use_dora", "use_dora"),
        ("bias", "bias"),
    ):
        value = getattr(pc, key, None)
        if key == "target_modules" and isinstance(value, (set, frozenset, list, tuple)):
            # "all-linear" comes back as every module's full name: the layer kinds say it all.
            value = {str(v).rsplit(".", 1)[-1] for v in value}
        if value is not None:
            out[label] = _text(value)
    return out
