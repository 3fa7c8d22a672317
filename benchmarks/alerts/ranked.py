"""Multi-rank cases on a simulated clock: stalls and stragglers.

Four clean traces of one model and learning rate (four seeds) become ranks 0-3 of one run. They
share rank 0's measured step times, stretched ×40 to a realistic 0.3-0.6 s per LLM step, plus a
few milliseconds of jitter per rank (ranks of a data-parallel job step together). Messages reach
the simulated viewer 50 ms after they are published; the viewer ticks every second.

- stall: rank r goes silent at step s for 60 s, 300 s or for good, while the others go on;
- straggler: from step s rank r's steps take f × as long (f = 1.6, 2, 3).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

from labelled import Case, Event
from lmtop.hooks import schema

STRETCH = 40.0
LATENCY = 0.05
TICK = 1.0


@dataclass
class RankedCase:
    name: str
    ranks: list[list[schema.Message]]  # per rank, publisher-time order
    events: list[Event] = field(default_factory=list)
    steps: int = 0
    event_t: float | None = None


def group(clean: list[Case]) -> list[RankedCase]:
    """One 4-rank run per (model, learning rate), on rank 0's stretched clock."""
    by_config: dict[str, list[Case]] = defaultdict(list)
    for case in clean:
        by_config[case.name.rsplit("-s", 1)[0]].append(case)
    out = []
    rng = random.Random(1)
    for key, cases in sorted(by_config.items()):
        cases = cases[:4]
        base = {m.step: m.t for m in cases[0].messages if m.kind == schema.METRICS}
        t0 = cases[0].messages[0].t
        ranks = []
        for r, case in enumerate(cases):
            messages = []
            t_pub = t0  # a start: with rank 0's
            for m in case.messages:
                # A message with a step takes rank 0's time of that step; one without (start,
                # events, end) stays beside the message before it. Its own time is another
                # run's wall clock: kept, it would put a start minutes away from its steps.
                if m.step is not None:
                    t_pub = base.get(m.step, t_pub)
                t = (t_pub - t0) * STRETCH + rng.uniform(0, 0.01) + (m.kind == schema.END) * 0.1
                data = dict(m.data, run=key, rank=r, world=len(cases))
                messages.append(
                    schema.Message(key, r, len(cases), m.seq, t, m.kind, m.step, m.m, data)
                )
            ranks.append(messages)
        out.append(RankedCase(key, ranks, [], sum(c.steps for c in cases)))
    return out


def stall(case: RankedCase, seconds: float, rng: random.Random) -> RankedCase:
    """Rank r silent from step s for ``seconds`` (inf: it never speaks again)."""
    r = rng.randrange(len(case.ranks))
    messages = case.ranks[r]
    metric_rows = [i for i, m in enumerate(messages) if m.kind == schema.METRICS]
    cut = metric_rows[rng.randrange(300, len(metric_rows) - 300)]
    last = messages[cut - 1]
    if seconds == float("inf"):
        new = messages[:cut]
    else:
        new = messages[:cut] + [_shift(m, seconds) for m in messages[cut:]]
    ranks = [new if i == r else list(msgs) for i, msgs in enumerate(case.ranks)]
    event = Event("stall", None, last.step or 0, rank=r)
    return RankedCase(f"{case.name}/stall-{seconds:g}", ranks, [event], case.steps, last.t)


def straggler(case: RankedCase, factor: float, rng: random.Random) -> RankedCase:
    """From step s rank r steps ``factor`` × slower than the others."""
    r = rng.randrange(len(case.ranks))
    messages = case.ranks[r]
    metric_rows = [i for i, m in enumerate(messages) if m.kind == schema.METRICS]
    cut = metric_rows[rng.randrange(300, len(metric_rows) - 800)]
    start_t = messages[cut].t
    new = messages[:cut] + [_shift(m, (factor - 1) * (m.t - start_t)) for m in messages[cut:]]
    ranks = [new if i == r else list(msgs) for i, msgs in enumerate(case.ranks)]
    event = Event("straggler", None, messages[cut].step or 0, rank=r)
    return RankedCase(f"{case.name}/straggler-{factor:g}", ranks, [event], case.steps, start_t)


def _shift(m: schema.Message, seconds: float) -> schema.Message:
    return schema.Message(m.run, m.rank, m.world, m.seq, m.t + seconds, m.kind, m.step, m.m, m.data)


def replay(case: RankedCase, engine: object) -> list[tuple[object, float]]:
    """Feeds the case through ``engine`` and a run book (feed, and tick on the simulated
    clock: the book's health judged every TICK seconds); (alert, time)."""
    from lmtop.tui.runbook import RunBook

    arrivals = sorted(
        ((m.t + LATENCY, m.rank, m.seq, m) for msgs in case.ranks for m in msgs),
        key=lambda x: x[:3],
    )
    settings = engine.settings  # type: ignore[attr-defined]
    book = RunBook(settings.stall, settings.straggler)
    key = case.ranks[0][0].run
    run = book.run(key, key, None)
    for rank in range(len(case.ranks)):
        book.rank(run, rank).last_seen = arrivals[0][0]
    out = []
    next_tick = arrivals[0][0] + TICK
    for now, rank, _, message in arrivals:
        while next_tick <= now:
            out += [(a, next_tick) for a in engine.tick(book.health(next_tick))]  # type: ignore[attr-defined]
            next_tick += TICK
        state = run.ranks[rank]
        if book.apply(run, state, message):
            state.last_seen = now  # the simulated clock, not the machine's
        out += [(a, now) for a in engine.feed(key, message)]  # type: ignore[attr-defined]
    end = arrivals[-1][0]
    while next_tick <= end + 120 and not run.all_done(next_tick):  # a hung rank: the others ended
        out += [(a, next_tick) for a in engine.tick(book.health(next_tick))]  # type: ignore[attr-defined]
        next_tick += TICK
    return out


def build(clean: list[Case], seed: int = 0) -> dict[str, list[RankedCase]]:
    rng = random.Random(seed)
    runs = group(clean)
    return {
        "clean": runs,
        "stall": [
            stall(c, s, rng) for c in runs for s in (60.0, 300.0, float("inf")) for _ in range(2)
        ],
        "straggler": [
            straggler(c, f, rng) for c in runs for f in (1.6, 2.0, 3.0) for _ in range(2)
        ],
    }
