"""Alert thresholds: documented defaults, a TOML file, and ``KEY=VALUE`` overrides from the CLI.

Layers, each overriding the one before: the defaults below; the user's file
(``$XDG_CONFIG_HOME/lmtop/lmtop.toml``, else ``~/.config/lmtop/lmtop.toml``); an ``lmtop.toml``
beside the runs (in a folder of runs that was named, the parent of a named run directory, or the
current directory); or, instead of those two, the file given with ``--config``; then
``--alert-set section.key=value`` flags. A file holds the sections below, either at its top level
or under ``[alerts]``::

    [alerts.spike]
    warning_ratio = 20.0            # a spike is a warning from 20× its running median
    metrics = { tokens_per_second = "down" }   # added to loss and grad norm

Reading TOML needs Python 3.11+ (``tomllib``) or the ``tomli`` package on 3.10.

Safety: ``on_alert`` is a shell command, so it is taken only from the user's own file,
``--config`` or the command line; an ``lmtop.toml`` beside the data (which anyone able to write
there could have planted) sets thresholds only, and an ``on_alert`` in it is ignored with a note
on stderr. Any file not owned by the user, writable by group or others, or not a regular file is
refused: the user's own file and ``--config`` with a :class:`SettingsError`, a file beside the
data is skipped with a note on stderr.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "lmtop.toml"


class SettingsError(ValueError):
    """A configuration file or override that cannot be used; the message says which and why."""


class UnsafeFile(SettingsError):
    """A config file that someone else could have written: not the user's, or open to others."""


@dataclass(slots=True)
class SpikeSettings:
    """Spikes: a value far from a robust rolling baseline, in the metric's bad direction."""

    enabled: bool = True
    shift_steps: int = 10  # outliers in a row that are a new level, taken into the baseline
    warmup: int = 20  # points seen before the first alert
    merge_steps: int = 5  # points back at baseline before a new spike is a new alert
    # TailSpikeDetector, the detector that learns the run's own tail (benchmarks/README.md,
    # "Spike detectors on real fine-tunes"). Positive series are judged on a log scale: a grad
    # norm or a near-zero loss is noisy in proportion to its level.
    tail_window: int = 100  # recent values whose median is the baseline: llm-foundry's window,
    # and the one the labelled set sizes its spikes with, so "10× the median" means the same
    tail_alpha: float = 0.98  # EMA weight of the noise scale: about the last 50 values
    tail_spread_floor: float = 0.35  # the noise scale is at least this × the mean absolute
    # deviation on both sides: a series falling steadily below its lagging median (a near-zero
    # loss) has no bad side to learn its noise from
    tail_winsor: float = 3.0  # deviations enter the noise scale clipped at this many scales, so a
    # spike does not inflate its own baseline (ZClip's idea, on the log scale)
    tail_threshold: float = 4.5  # noise scales a point must pass even on the calmest run: a loss
    # spike of 8 rolling MADs is 4-7 of these scales; Gaussian noise passes 4.5 (3.6σ) once in
    # 6,000 points, and the run's own quantile below raises the bar where the tail is heavier
    tail_quantile: float = 0.99  # the run's own high quantile of deviations it tracks ...
    tail_margin: float = 1.5  # ... and a point must pass this × that quantile: real grad norms
    # (q99 of 4-6 scales on tiny-Llama fine-tunes) stop crying wolf, calm losses stay sensitive;
    # 1.4 gave 17-19 info per 10k steps on batch-1 runs, 1.5 gives 15-17 (benchmarks/README.md)
    tail_quantile_start: float = 3.0  # that quantile before the run has shown its own: a
    # Gaussian's q99 in these scales (2.33σ / 0.8σ)
    tail_quantile_step: float = 0.1  # scales the quantile climbs per exceedance (it falls by
    # step × (1 - quantile) otherwise): ~20 excursions lift it by 2, one spike barely moves it
    tail_memory: int = 1000  # steps over which "this run's usual max ratio" decays by 1/e
    warning_ratio: float = 10.0  # a spike ≥ this × its running median is a warning, else info
    # (once a full window is behind the median: a fine-tune's first steps move 10× by design)
    tail_ratio_margin: float = 2.0  # ... and this × the run's usual max ratio: 10× is a warning
    # on a run whose grad norm swings 2-5× (batch 1), not on one whose own clean tail reaches
    # 10-190× (LoRA, batch 1, no clipping), nor on a near-zero loss that swings 13×. Such a
    # jump counts even under the run's noise quantile while warning_ratio / tail_ratio_margin
    # (5×) is above the usual swing, from tail_window + warmup steps on
    info_ratio: float = 1.5  # other series (grad norm): an outlier below this × its median
    # (above, for a drop) is no record at all: a smooth run's grad norm (the demo's) stands out
    # of its noise at 1.2×, which no one needs to hear about (the loss is judged in MADs below)
    mad_threshold: float = 7.5  # the training loss is also judged by the classic rule: a point
    # this many rolling MADs (window tail_window, on the loss's own scale, not the log) above its
    # median is an info outlier. 7.5, not 8: the window holds no past spikes, so "8 MADs of the
    # clean window" lands at 7.6-8.1 of its MADs; clean Llama and transformer losses never reach
    # it (0 per 10k), and it lifts their recall of 8-MAD spikes from 0.97-0.99 to 1.00
    mad_usual_margin: float = 1.5  # ... when its excess over the median (ratio - 1) is also past
    # this × the run's usual max excess. A near-zero loss (the MLP families) lies ≥ 8 MADs above
    # its median 23-38 times per 10k clean steps, so catching 0.99 of 8-MAD spikes there costs
    # 44-56 info per 10k (margin 1.0); 1.5 catches 0.66 at 11 in all (loss and grad norm);
    # 1.4 catches 0.71-0.78 at 11-15 from the loss alone, but 27 on one run (benchmarks/README.md)
    # Metric name -> "up" | "down" | "both", on top of train loss and grad norm (always "up").
    metrics: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class NonFiniteSettings:
    """NaN and ±Inf in any metric: critical, at once."""

    enabled: bool = True
    rearm_steps: int = 100  # finite values of that metric before another alert


@dataclass(slots=True)
class DivergenceSettings:
    """The training loss's rolling median far above its best, or climbing."""

    enabled: bool = True
    window: int = 25  # values whose median is the loss's level
    warmup: int = 100  # points before the best level counts
    ratio: float = 0.3  # level above best by this fraction of best ...
    noise: float = 8.0  # ... and by this many noise scales


@dataclass(slots=True)
class OverfittingSettings:
    """Eval loss up over consecutive evaluations while the training loss falls."""

    enabled: bool = True
    evaluations: int = 3  # K consecutive rises
    min_rise: float = 0.01  # and at least this fraction above the best eval loss
    noise: float = 3.0  # and this many times the eval loss's own evaluation-to-evaluation noise
    # (the median absolute change between evaluations): a healthy run's eval loss wanders 1-2 %
    # between evaluations and rises three times in a row by chance (examples/plain_loop.py did
    # at step 1925 of 2500); a model that overfits keeps rising past its noise
    sustained: float = 3.5  # ... or K consecutive evaluations this many noise units above the
    # best, rising or not: a noisy eval loss (the MLP families', ±40 % between evaluations)
    # climbing 10 % per evaluation seldom rises K times in a row (benchmarks/README.md)
    hold: int = 4  # evaluations a new learning-curve verdict must hold before it is told (3 let
    # examples/plain_loop.py flip 9 times in 2500 steps; 4: underfitting, overfitting, fitting well)


@dataclass(slots=True)
class ClippingSettings:
    """Grad norm above the run's max_grad_norm on most recent steps."""

    enabled: bool = True
    window: int = 100
    fraction: float = 0.9
    min_points: int = 50


@dataclass(slots=True)
class LearningRateSettings:
    """A learning rate that drops to zero after warm-up (non-finite is a NaN alert)."""

    enabled: bool = True
    abrupt_fraction: float = 0.05  # a cut to zero from above this fraction of the peak
    zero_steps: int = 100  # zero since the start for this many points past warm-up


@dataclass(slots=True)
class MemorySettings:
    """Device memory near its total, when the total is known."""

    enabled: bool = True
    fraction: float = 0.95
    rearm_fraction: float = 0.9


@dataclass(slots=True)
class StallSettings:
    """A live rank silent while the others progress."""

    enabled: bool = True
    min_seconds: float = 30.0
    intervals: float = 10.0  # × the rank's median interval between steps


@dataclass(slots=True)
class StragglerSettings:
    """A rank slower than the others, or behind the leading rank."""

    enabled: bool = True
    ratio: float = 1.5  # step time above this × the median of the other ranks
    rearm_ratio: float = 1.25
    lag_steps: int = 100  # steps behind the leading rank
    window: int = 20  # step intervals in a rank's median step time


@dataclass(slots=True)
class AlertSettings:
    """Every alert threshold; ``AlertSettings()`` holds the documented defaults."""

    enabled: bool = True
    spike: SpikeSettings = field(default_factory=SpikeSettings)
    nonfinite: NonFiniteSettings = field(default_factory=NonFiniteSettings)
    divergence: DivergenceSettings = field(default_factory=DivergenceSettings)
    overfitting: OverfittingSettings = field(default_factory=OverfittingSettings)
    clipping: ClippingSettings = field(default_factory=ClippingSettings)
    learning_rate: LearningRateSettings = field(default_factory=LearningRateSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    stall: StallSettings = field(default_factory=StallSettings)
    straggler: StragglerSettings = field(default_factory=StragglerSettings)
    # Where alerts go.
    on_alert: str | None = None  # shell command, the alert as JSON on its stdin
    on_alert_per_minute: int = 6
    snapshots: bool = True  # every metric ±50 steps around a critical alert, in the run dir

    def merged(self, values: Mapping[str, Any], origin: str = "settings") -> AlertSettings:
        """A copy with ``values`` (nested like the TOML file) applied; raises SettingsError."""
        copy = dataclasses.replace(self)
        for item in dataclasses.fields(copy):
            value = getattr(copy, item.name)
            if dataclasses.is_dataclass(value):
                setattr(copy, item.name, dataclasses.replace(value))  # type: ignore[type-var]
        _apply(copy, values, origin, "")
        return copy


# Settings of detectors the viewer no longer has: a file that still sets them is read, with a
# note, rather than refused (the first spike detector's, replaced in issue 12).
REMOVED = {
    "spike.threshold": "spike.tail_threshold",
    "spike.window": "spike.tail_window",
    "spike.log": "nothing: positive series are always judged on a log scale",
}


def _apply(target: Any, values: Mapping[str, Any], origin: str, prefix: str) -> None:
    known = {item.name: item for item in dataclasses.fields(target)}
    for key, value in values.items():
        name = key.replace("-", "_")
        where = f"{origin}: {prefix}{key}"
        if f"{prefix}{name}" in REMOVED and name not in known:
            _note(f"{where} is ignored: that detector is gone (see {REMOVED[prefix + name]})")
            continue
        if name not in known:
            raise SettingsError(f"{where}: unknown setting (known: {', '.join(sorted(known))})")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise SettingsError(f"{where}: expected a table of settings")
            _apply(current, value, origin, f"{prefix}{key}.")
            continue
        setattr(target, name, _coerce(current, value, where, name))


def _coerce(current: Any, value: Any, where: str, name: str) -> Any:
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "false",
            "1",
            "0",
            "yes",
            "no",
            "on",
            "off",
        ):
            return value.lower() in ("true", "1", "yes", "on")
        raise SettingsError(f"{where}: expected true or false, got {value!r}")
    if isinstance(current, dict):
        if isinstance(value, str):  # from a flag: "loss=up,tokens_per_second=down"
            value = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
        if not isinstance(value, Mapping) or any(
            v not in ("up", "down", "both") for v in value.values()
        ):
            raise SettingsError(f'{where}: expected metric = "up" | "down" | "both"')
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(current, int):
        try:
            number = int(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or number < 0:
            raise SettingsError(f"{where}: expected a whole number ≥ 0, got {value!r}")
        return number
    if isinstance(current, float):
        try:
            number_ = float(value) if not isinstance(value, bool) else -1.0
        except (TypeError, ValueError):
            number_ = -1.0
        if not number_ >= 0:
            raise SettingsError(f"{where}: expected a number ≥ 0, got {value!r}")
        return number_
    if value is None or isinstance(value, str):
        return value or None
    raise SettingsError(f"{where}: expected text, got {value!r}")


def parse_override(text: str) -> dict[str, Any]:
    """``"spike.tail_threshold=8"`` as ``{"spike": {"tail_threshold": "8"}}`` (coerced when
    applied)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SettingsError(f"--alert-set {text!r}: expected SECTION.KEY=VALUE")
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value.strip()
    return nested


def read_toml(path: Path) -> dict[str, Any]:
    """The alert settings table of a TOML file (its ``[alerts]`` table, or the whole file)."""
    try:
        import tomllib as toml
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as toml
        except ModuleNotFoundError:
            raise SettingsError(
                f"{path}: reading TOML needs Python 3.11+ or `pip install tomli`"
            ) from None
    try:
        data = toml.loads(_read_owned(path).decode("utf-8", errors="replace"))
    except toml.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    table = data.get("alerts", data)
    if not isinstance(table, dict):
        raise SettingsError(f"{path}: [alerts] must be a table")
    return table


def _read_owned(path: Path) -> bytes:
    """The bytes of a config file owned by this user and writable by nobody else.

    Opened without blocking (a FIFO cannot hang the viewer) and checked on the open file, so the
    file checked is the file read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SettingsError(f"{path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"{path}: refused, not a regular file")
        if info.st_uid != os.getuid():
            raise UnsafeFile(
                f"{path}: refused, owned by uid {info.st_uid}, not by you (uid {os.getuid()})"
            )
        if info.st_mode & 0o022:
            raise UnsafeFile(
                f"{path}: refused, writable by group or others (mode {stat.S_IMODE(info.st_mode):o}; "
                f"chmod go-w {path})"
            )
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            if sum(map(len, chunks)) > 1 << 20:
                raise UnsafeFile(f"{path}: refused, over 1 MiB")
        return b"".join(chunks)
    except OSError as exc:
        raise SettingsError(f"{path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def user_config_file() -> Path:
    """``$XDG_CONFIG_HOME/lmtop/lmtop.toml``, else ``~/.config/lmtop/lmtop.toml``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "lmtop" / CONFIG_NAME


def beside_file(paths: Sequence[str] = ()) -> Path | None:
    """The first ``lmtop.toml`` beside the data: thresholds only, never a command."""
    for folder in _beside(paths):
        candidate = folder / CONFIG_NAME
        if candidate.is_file():
            return candidate
    return None


def _merge_beside(settings: AlertSettings, path: Path) -> AlertSettings:
    try:
        table = read_toml(path)
    except UnsafeFile as exc:
        _note(f"{exc}; its settings are ignored")
        return settings
    commands = [key for key in table if key.replace("-", "_") == "on_alert"]
    if commands:
        _note(
            f"{path}: on_alert ignored (a file beside the data sets thresholds only; "
            "put commands in your own lmtop.toml, --config or --on-alert)"
        )
        table = {key: value for key, value in table.items() if key not in commands}
    return settings.merged(table, origin=str(path))


def _note(text: str) -> None:
    print(f"lmtop: {text}", file=sys.stderr, flush=True)


def _beside(paths: Sequence[str]) -> Iterable[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            path = path.parent
        yield path
        yield path.parent
    yield Path(os.environ.get("LMTOP_DIR") or "lmtop_runs")
    yield Path.cwd()


def load(
    paths: Sequence[str] = (),
    config: str | None = None,
    overrides: Sequence[str] = (),
) -> AlertSettings:
    """The settings that apply to a viewer of ``paths``; raises SettingsError with the reason.

    A file beside the data that is unsafe is skipped, and its ``on_alert`` ignored, with a note
    on stderr (see the module's docstring).
    """
    settings = AlertSettings()
    if config:
        settings = settings.merged(read_toml(Path(config)), origin=config)
    else:
        user = user_config_file()
        if user.is_file():
            settings = settings.merged(read_toml(user), origin=str(user))
        beside = beside_file(paths)
        if beside is not None and not (user.is_file() and beside.resolve() == user.resolve()):
            settings = _merge_beside(settings, beside)
    for text in overrides:
        settings = settings.merged(parse_override(text), origin="--alert-set")
    return settings
