"""The series store: every point of every metric of every rank, compact, with a min/max pyramid.

A point costs 24 bytes (step, wall time, value in three flat arrays), or about 8 when the
series shares its steps and times with the other metrics of the same messages (the usual case:
one ``publish`` call reports ten metrics at one step and time). Blocks of 64 and of 4096
points keep their finite min, max, sum and count, so asking for the min and max of each terminal
column costs the same whether a series holds ten thousand points or ten million: charts decimate
from the full series every frame, and never hide a spike.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from lmtop.hooks import schema

B1 = 64  # points per level-1 block
B2 = B1 * B1  # points per level-2 block
INF = math.inf
# An extend that fills this many level-1 blocks has them summarised together (numpy).
MANY_BLOCKS = 16


def fsum(values: Iterable[float]) -> float:
    """``math.fsum``, or ±inf where finite values sum beyond the float range (two points of
    1.7e308 in a block), which ``math.fsum`` raises for."""
    try:
        return math.fsum(values)
    except OverflowError:
        return sum(values)


@dataclass(slots=True)
class Columns:
    """One series decimated to terminal columns; a column with no finite value is left out."""

    col: list[int] = field(default_factory=list)  # the column's index, 0 to ncols - 1
    x: list[float] = field(default_factory=list)  # the column's x (step, or wall time)
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    nonfinite: list[tuple[float, float]] = field(default_factory=list)  # (x, value) of NaN/Inf


class Series:
    """The points of one metric of one rank, in arrival order (steps should not go back)."""

    __slots__ = ("b1", "b2", "nonfinite", "shared", "steps", "times", "values")

    def __init__(self, steps: array[int] | None = None, times: array[float] | None = None) -> None:
        # Given steps and times are another owner's (a Store's group index), extended by it.
        self.shared = steps is not None
        self.steps = steps if steps is not None else array("q")
        self.times = times if times is not None else array("d")
        self.values = array("d")
        self.nonfinite: list[int] = []  # indices of NaN/Inf points
        # Per block: finite min, max, sum and count.
        self.b1 = (array("d"), array("d"), array("d"), array("d"))
        self.b2 = (array("d"), array("d"), array("d"), array("d"))

    def __len__(self) -> int:
        return len(self.values)

    @property
    def last(self) -> float:
        """The latest value (NaN for an empty series)."""
        return self.values[-1] if self.values else math.nan

    def extend(
        self,
        steps: array[int] | list[int],
        times: array[float] | list[float],
        values: Sequence[float],
    ) -> None:
        """Appends points; the block summaries they touch are recomputed."""
        self.own()
        self.steps.extend(steps)
        self.times.extend(times)
        self.extend_values(values)

    def own(self) -> None:
        """Takes its own copy of shared steps and times (before they take other points)."""
        if self.shared:
            self.steps, self.times, self.shared = (
                array("q", self.steps),
                array("d", self.times),
                False,
            )

    def extend_values(self, values: Sequence[float]) -> None:
        """Appends the values of points whose steps and times are already in place."""
        if not len(values):
            return
        start = len(self.values)
        self.values.extend(values)
        total = sum(values)
        end = len(self.values)
        if (
            total - total == 0.0
            and start // B1 == (end - 1) // B1
            and not self._has_nonfinite(start // B1 * B1, start)
        ):  # a few finite points into the last block: a live poll's
            self._extend_block(values, start, end)
            return
        if total - total != 0.0:  # a NaN or an infinity among them (or a sum beyond range)
            for offset, value in enumerate(values):
                if value - value != 0.0:
                    self.nonfinite.append(start + offset)
        first, whole = start // B1, end // B1
        if whole - first >= MANY_BLOCKS:  # a history's worth: its full blocks at once
            self._summarise_blocks(first, whole)
            first = whole
        for block in range(first, (end - 1) // B1 + 1):
            self._summarise(
                self.b1, block, *self._raw_summary(block * B1, min(end, block * B1 + B1))
            )
        for block in range(start // B2, (end - 1) // B2 + 1):
            lo, hi = block * B1, min(len(self.b1[0]), block * B1 + B1)
            mins, maxs, sums, counts = self.b1
            self._summarise(
                self.b2,
                block,
                min(mins[lo:hi]),
                max(maxs[lo:hi]),
                sum(sums[lo:hi]),
                sum(counts[lo:hi]),
            )

    def _extend_block(self, values: Sequence[float], start: int, end: int) -> None:
        """The summaries after finite ``values`` were added at ``[start, end)``, all in the last
        level-1 block, which holds no NaN: updated, not recomputed (min and max of the old and
        the new, in that order, are the block's; the sums are taken again, as a recomputation
        takes them)."""
        block = start // B1
        mins, maxs, sums, counts = self.b1
        if block < len(mins):
            mins[block] = min(mins[block], min(values))
            maxs[block] = max(maxs[block], max(values))
            sums[block] = fsum(self.values[block * B1 : end])
            counts[block] += len(values)
        else:
            mins.append(min(values))
            maxs.append(max(values))
            sums.append(fsum(values))
            counts.append(float(len(values)))
        top = block // B1  # its level-2 block, and where that block's level-1 blocks begin
        first = top * B1
        mins2, maxs2, sums2, counts2 = self.b2
        if top < len(mins2):
            mins2[top] = min(mins2[top], mins[block])
            maxs2[top] = max(maxs2[top], maxs[block])
            sums2[top] = sum(sums[first:])
            counts2[top] += len(values)
        else:  # a new level-2 block: this level-1 block is its first
            mins2.append(mins[block])
            maxs2.append(maxs[block])
            sums2.append(sum(sums[first:]))
            counts2.append(sum(counts[first:]))

    def _summarise_blocks(self, first: int, stop: int) -> None:
        """The level-1 summaries of the full blocks ``[first, stop)``, computed together (what
        :meth:`_raw_summary` gives each, NaN and infinities left out alike)."""
        import numpy as np

        blocks = np.frombuffer(self.values[first * B1 : stop * B1], dtype=np.float64)
        blocks = blocks.reshape(stop - first, B1)
        finite = np.isfinite(blocks)
        rows = blocks.tolist()
        if finite.all():
            mins, maxs = blocks.min(axis=1), blocks.max(axis=1)
            counts = np.full(stop - first, float(B1))
            sums = list(map(fsum, rows))
        else:
            mins = np.where(finite, blocks, INF).min(axis=1)
            maxs = np.where(finite, blocks, -INF).max(axis=1)
            counts = finite.sum(axis=1).astype(np.float64)
            whole = [bool(ok) for ok in np.all(finite, axis=1).tolist()]
            sums = [
                fsum(row) if ok else fsum([v for v in row if v - v == 0.0])
                for row, ok in zip(rows, whole)
            ]
        # numpy's min and max pick either zero of 0.0 and -0.0; Python's keep the first, as a
        # block summarised on its own does: blocks with a zero at either end are taken again.
        for row in np.flatnonzero((mins == 0.0) | (maxs == 0.0)).tolist():
            finite_row = [v for v in rows[row] if v - v == 0.0]
            mins[row], maxs[row] = min(finite_row), max(finite_row)
        for column, summary in zip(self.b1, (mins, maxs, sums, counts)):
            del column[first:]
            column.extend(
                array("d", summary.tobytes()) if isinstance(summary, np.ndarray) else summary
            )

    @staticmethod
    def _summarise(level: tuple[array, ...], block: int, *summary: float) -> None:
        if block < len(level[0]):
            for column, value in zip(level, summary):
                column[block] = value
        else:
            for column, value in zip(level, summary):
                column.append(value)

    def _has_nonfinite(self, lo: int, hi: int) -> bool:
        return bisect_left(self.nonfinite, lo) < bisect_left(self.nonfinite, hi)

    def _raw_summary(self, lo: int, hi: int) -> tuple[float, float, float, float]:
        values = self.values[lo:hi]
        if self._has_nonfinite(lo, hi):
            values = array("d", (v for v in values if v - v == 0.0))
        if not values:
            return INF, -INF, 0.0, 0.0
        return min(values), max(values), fsum(values), float(len(values))

    def _summary(self, lo: int, hi: int, size: int) -> tuple[float, float, float, float]:
        """Finite min, max, sum and count of points ``[lo, hi)``, both multiples of ``size``."""
        if size == 1:
            return self._raw_summary(lo, hi)
        mins, maxs, sums, counts = self.b1 if size == B1 else self.b2
        a, b = lo // size, -(-hi // size)
        if a >= b:
            return INF, -INF, 0.0, 0.0
        return min(mins[a:b]), max(maxs[a:b]), sum(sums[a:b]), sum(counts[a:b])

    def index(self, step: float) -> int:
        """The index of the first point at or after ``step``."""
        return bisect_left(self.steps, math.ceil(step))

    def columns(self, x_lo: float, x_hi: float, ncols: int, by_time: bool = False) -> Columns:
        """Decimates the points with x in ``[x_lo, x_hi]`` to ``ncols`` columns of min and max.

        Column boundaries are snapped to block boundaries consistently, so the columns partition
        the points: every point, and so every spike, lands in exactly one column.
        """
        out = Columns()
        keys = self.times if by_time else self.steps
        a, b = bisect_left(keys, x_lo), bisect_right(keys, x_hi)
        if b <= a or ncols <= 0:
            return out
        per = (b - a) / ncols
        size = B2 if per >= 2 * B2 else B1 if per >= 2 * B1 else 1
        if per <= 1.0:  # fewer points than columns: every point is its own column
            bounds = list(range(a, b + 1))
        else:
            width = (x_hi - x_lo) / ncols
            bounds = [a] + [bisect_left(keys, x_lo + width * c) for c in range(1, ncols)] + [b]
            if size > 1:
                bounds = [a] + [round(i / size) * size for i in bounds[1:-1]] + [b]
                bounds = [min(max(i, a), b) for i in bounds]
        last = len(self.values) - 1
        for column, (lo, hi) in enumerate(pairwise(bounds)):
            if hi <= lo:
                continue
            if size > 1 and (lo % size or hi % size):
                head = min(hi, -(-lo // size) * size)
                tail = max(head, hi // size * size)
                parts = [
                    self._raw_summary(lo, head),
                    self._summary(head, tail, size),
                    self._raw_summary(tail, hi),
                ]
                low = min(p[0] for p in parts)
                high = max(p[1] for p in parts)
                total, count = sum(p[2] for p in parts), sum(p[3] for p in parts)
            else:
                low, high, total, count = self._summary(lo, hi, size)
            x = keys[min((lo + hi - 1) // 2, last)]
            if count:
                out.col.append(
                    column if per > 1.0 else int((x - x_lo) / max(x_hi - x_lo, 1e-12) * (ncols - 1))
                )
                out.x.append(x)
                out.low.append(low)
                out.high.append(high)
                out.mean.append(total / count)
        first, stop = bisect_left(self.nonfinite, a), bisect_left(self.nonfinite, b)
        marks = self.nonfinite[first:stop]
        if len(marks) > ncols:  # one mark per column is enough to be seen
            marks = marks[:: max(1, len(marks) // ncols)]
        out.nonfinite = [(keys[i], self.values[i]) for i in marks]
        return out

    def nbytes(self) -> int:
        """Bytes held by the arrays (what resident memory per point is made of)."""
        arrays: Iterable[array] = (self.steps, self.times, self.values, *self.b1, *self.b2)
        return sum(a.buffer_info()[1] * a.itemsize for a in arrays) + 8 * len(self.nonfinite)


class Store:
    """Every series of every run: ``(run key, rank, metric) -> Series``, fed message batches.

    Steps of a series never go back (the min/max pyramid and the x axis bisect them): a point
    whose step is below the series' last one is dropped and counted in ``backwards``, as W&B
    drops a step lower than the current one. Equal steps are kept.
    """

    def __init__(self) -> None:
        self.series: dict[tuple[str, int, str], Series] = {}
        self.metrics: dict[str, set[str]] = {}  # run key -> metric names
        self.last_step: dict[tuple[str, int], int] = {}
        self.backwards: dict[str, int] = {}  # run key -> points dropped for a step that went back
        self.points = 0
        # (run, rank, metric names) -> the steps and times shared by those series while every
        # point of theirs came from messages with exactly those names. Dropped when a group
        # arrives that no series shares any more (each has taken its own copy).
        self.groups: dict[tuple[str, int, tuple[str, ...]], tuple[array[int], array[float]]] = {}

    def add(self, batch: Iterable[tuple[str, schema.Message]]) -> int:
        """Adds the metrics messages of a batch of (run key, message); returns points added.

        A rank's messages in a row (in the batch's order once the ranks are put apart) with the
        same metric names, the usual case, are added as one group: one list of steps and times
        shared by its series, one list per metric.
        """
        added = 0
        group: list[schema.Message] = []
        group_key = ""
        # Live frames come round robin over the ranks: each rank's messages are put together
        # (in their order), so that a poll is one group a rank, not one a message.
        for key, message in sorted(batch, key=_run_and_rank):
            if message.kind != schema.METRICS or message.step is None or not message.m:
                continue
            if group and not (
                key == group_key
                and message.rank == group[0].rank
                and message.m.keys() == group[0].m.keys()
                and message.step >= group[-1].step
            ):
                added += self._add_group(group_key, group)
                group = []
            group.append(message)
            group_key = key
        if group:
            added += self._add_group(group_key, group)
        return added

    def _add_group(self, run: str, group: list[schema.Message]) -> int:
        """Adds one rank's messages with the same names and non-decreasing steps."""
        first = group[0]
        names = tuple(first.m)
        # Converted once, copied as bytes into each series (not a float object at a time).
        steps = array("q", [m.step for m in group])
        times = array("d", [m.t for m in group])
        columns = [[m.m[name] for m in group] for name in names]
        return self.add_columns(run, first.rank, names, steps, times, columns)

    def add_columns(
        self,
        run: str,
        rank: int,
        names: tuple[str, ...],
        steps: array[int],
        times: array[float],
        columns: Sequence[Sequence[float]],
    ) -> int:
        """Adds points of one rank given as columns: ``columns[i][j]`` is metric ``names[i]``
        at ``steps[j]`` and ``times[j]`` (steps non-decreasing), exactly as :meth:`add` adds
        the messages they came from; returns points added."""
        if not len(steps):
            return 0
        self.last_step[(run, rank)] = max(steps[-1], self.last_step.get((run, rank), steps[-1]))
        added = 0
        group_key = (run, rank, names)
        index = self.groups.get(group_key)
        if index is None:
            index = self.groups[group_key] = (array("q"), array("d"))
        index_steps, index_times = index
        sharing = []
        for name, values in zip(names, columns):
            key = (run, rank, name)
            series = self.series.get(key)
            if series is None:
                series = Series(*index) if not index_steps else Series()
                self.series[key] = series
                self.metrics.setdefault(run, set()).add(name)
            if series.shared and series.steps is index_steps:
                sharing.append((series, values))
                continue
            start = 0
            if len(series) and series.steps[-1] > steps[0]:  # went back: keep what is not
                start = bisect_left(steps, series.steps[-1])
                self.backwards[run] = self.backwards.get(run, 0) + start
            if start == 0:
                series.extend(steps, times, values)
            elif start < len(steps):
                series.extend(steps[start:], times[start:], values[start:])
            added += len(steps) - start
        if not sharing:
            del self.groups[group_key]
        else:  # their steps are the index's: what is kept is the same for all of them
            start = 0
            if index_steps and index_steps[-1] > steps[0]:
                start = bisect_left(steps, index_steps[-1])
                self.backwards[run] = self.backwards.get(run, 0) + start * len(sharing)
            index_steps.extend(steps[start:])
            index_times.extend(times[start:])
            for series, values in sharing:
                series.extend_values(values[start:] if start else values)
            added += (len(steps) - start) * len(sharing)
        self.points += added
        return added

    def ranks(self, run: str, metric: str) -> list[int]:
        """The ranks that published ``metric`` in ``run``."""
        return sorted(rank for (r, rank, m) in self.series if r == run and m == metric)

    def get(self, run: str, rank: int, metric: str) -> Series | None:
        """One series, or None."""
        return self.series.get((run, rank, metric))

    def nbytes(self) -> int:
        """Bytes held by every series (shared steps and times counted once)."""
        total, seen = 0, set()
        for series in self.series.values():
            total += series.nbytes()
            if series.shared:
                if id(series.steps) in seen:
                    total -= sum(
                        a.buffer_info()[1] * a.itemsize for a in (series.steps, series.times)
                    )
                seen.add(id(series.steps))
        return total

    # -- a rank's series as plain arrays (the columnar cache, ``cache.py``) ----------------------

    def rank_arrays(self, run: str, rank: int) -> tuple[dict[str, Any], dict[str, array]] | None:
        """Every series of one rank as flat arrays and a description of them, exactly as held
        (pyramid included, so what is drawn from them is the same); None if it cannot be."""
        if self.backwards.get(run):  # counted per run, not per rank: not carried over
            return None
        arrays: dict[str, array] = {}
        groups: list[list[str]] = []
        shared: dict[int, int] = {}  # id of a group's steps -> its index
        for (key_run, key_rank, names), (steps, times) in self.groups.items():
            if key_run == run and key_rank == rank:
                shared[id(steps)] = len(groups)
                arrays[f"g{len(groups)}.steps"], arrays[f"g{len(groups)}.times"] = steps, times
                groups.append(list(names))
        series: list[dict[str, Any]] = []
        for (key_run, key_rank, name), one in self.series.items():
            if key_run != run or key_rank != rank:
                continue
            index = len(series)
            group = shared.get(id(one.steps), -1) if one.shared else -1
            series.append({"name": name, "group": group})
            if group < 0:
                arrays[f"s{index}.steps"], arrays[f"s{index}.times"] = one.steps, one.times
            arrays[f"s{index}.values"] = one.values
            arrays[f"s{index}.nonfinite"] = array("q", one.nonfinite)
            for level, summaries in (("b1", one.b1), ("b2", one.b2)):
                for part, column in zip(_PARTS, summaries):
                    arrays[f"s{index}.{level}.{part}"] = column
        meta = {"groups": groups, "series": series, "last_step": self.last_step.get((run, rank))}
        return meta, arrays

    def adopt(self, restored: Iterable[tuple[str, int, dict[str, Any], dict[str, array]]]) -> None:
        """Takes ranks' series as :meth:`rank_arrays` gave them (ranks it holds nothing of)."""
        for run, rank, meta, arrays in restored:
            self._adopt(run, rank, meta, arrays)

    def _adopt(self, run: str, rank: int, meta: dict[str, Any], arrays: dict[str, array]) -> int:
        groups = []
        for index, names in enumerate(meta["groups"]):
            index_arrays = (arrays[f"g{index}.steps"], arrays[f"g{index}.times"])
            self.groups[(run, rank, tuple(names))] = index_arrays
            groups.append(index_arrays)
        added = 0
        for index, described in enumerate(meta["series"]):
            group = described["group"]
            if group >= 0:
                series = Series(*groups[group])
            else:
                series = Series(arrays[f"s{index}.steps"], arrays[f"s{index}.times"])
                series.shared = False
            series.values = arrays[f"s{index}.values"]
            series.nonfinite = list(arrays[f"s{index}.nonfinite"])
            series.b1 = _level(arrays, f"s{index}.b1")
            series.b2 = _level(arrays, f"s{index}.b2")
            self.series[(run, rank, described["name"])] = series
            self.metrics.setdefault(run, set()).add(described["name"])
            added += len(series)
        if meta["last_step"] is not None:
            self.last_step[(run, rank)] = meta["last_step"]
        self.points += added
        return added


def _run_and_rank(pair: tuple[str, schema.Message]) -> tuple[str, int]:
    return pair[0], pair[1].rank


_PARTS = ("min", "max", "sum", "count")  # a pyramid level's columns, by name in the cache


def _level(
    arrays: dict[str, array], prefix: str
) -> tuple[array[float], array[float], array[float], array[float]]:
    """One level of a series' pyramid from the cache's arrays."""
    mins, maxs, sums, counts = (arrays[f"{prefix}.{part}"] for part in _PARTS)
    return mins, maxs, sums, counts
