"""``lmtop``: the Textual app. A thin view of a :class:`~.source.Source` and a :class:`~.store.Store`.

One owner per piece of state. A thread worker owns the source (and its run book), the alert
engine and the store's writes; after each poll it posts a :class:`Polled` message with a frozen
snapshot of the runs and the alerts raised since the last one. The UI thread owns everything on
the screen, reads the snapshot it was handed, and draws from the store under ``store_lock``,
a lock that guards the store alone and is never held across a call into the UI or a wait. A
timer redraws charts that changed at most ``refresh_hz`` times a second, and the header and the
ranks table at least once a second, so a job going silent shows without a key press.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal
from textual.css.query import NoMatches
from textual.message import Message
from textual.widgets import Footer
from textual.worker import get_current_worker

from . import collector, discovery, frame
from .alert_settings import AlertSettings
from .alerts import Alert
from .charts import DEFAULT_CHARTS, ViewOptions
from .follow import Follower
from .keys import BINDINGS, Keys
from .replay import HistoryAlerts
from .runbook import RunView
from .source import Source
from .store import Store
from .system import SAMPLE_SECONDS, Sampler, SystemView
from .widgets import AlertsPanel, Chart, Header, RanksTable, RunsTable, SystemPanel

# Redraws per second at most, by default: a live chart moving twice a second reads as live (htop
# redraws every 1.5 s), and what crosses a slow SSH link stays under 30 KB/s (benchmarks/).
REFRESH_HZ = 2.0
# The share of one core the whole `lmtop` process may take while it follows runs (what top shows
# for it): when frames get expensive (16 ranks, a wide terminal) or the poll thread busy, charts
# are redrawn less often, down to once every MAX_FRAME_SECONDS, so that the viewer leaves the
# box's cores to the data loaders (the header still follows the clock). See FramePace.
CPU_BUDGET = 0.13
MAX_FRAME_SECONDS = 2.0
NOTHING_SECONDS = 5.0  # how often paths that show nothing are looked at again for why
CLOCK_SECONDS = 1.0  # the header and ranks table follow the clock at least this often
SNAPSHOT_SECONDS = 0.25  # the worker posts a snapshot at least this often, data or not
HEALTH_SECONDS = 0.5  # stalls and stragglers are judged this often


class Sampled(Message):
    """From the sampling worker: the machine as it stands."""

    def __init__(self, view: SystemView) -> None:
        super().__init__()
        self.view = view


class Polled(Message):
    """From the worker: the runs as they stand, and the alerts raised since the last one."""

    def __init__(self, runs: tuple[RunView, ...], alerts: list[Alert], data: bool) -> None:
        super().__init__()
        self.runs, self.alerts, self.data = runs, alerts, data


class LmtopApp(Keys):
    """Live charts of every rank of a training run."""

    TITLE = "lmtop"
    CSS_PATH = "app.tcss"
    BINDINGS = BINDINGS

    def __init__(
        self,
        source: Source,
        refresh_hz: float = REFRESH_HZ,
        alerts: Any = None,
        system: Callable[[], Sampler] | None = None,
        cpu_budget: float | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.engine = alerts  # an Alerting (or None): owned by the worker
        self.store = Store()  # written by the worker, read by the UI, both under store_lock
        self.store_lock = threading.Lock()
        self.refresh_hz = refresh_hz
        self.options = ViewOptions()
        self.runs: tuple[RunView, ...] = ()  # the latest snapshot
        self.alerts: list[Alert] = []
        self.catching_up = False  # a long history is being read
        self.alerts_owed = False  # alerts over a history read are still being computed
        self._was_catching_up = False
        # Turns of the poll thread that read, judged or cached a history (its work for a while,
        # not the pace of following): counted there, compared at each frame (FramePace).
        self.bursts = 0
        self._bursts_at_frame = 0
        self._painted = threading.Event()  # a frame of a history read to the end is on screen
        self._paint_pending = False
        self.dirty = True  # charts need a redraw
        self.drawn_at = self.clock_at = 0.0
        self.paused = False
        self.bell_on = True
        self.zoomed = False
        self.table_rows = 5  # the ranks the table shows at once, set by the layout
        self.rank_mode_chosen = False  # until `r` is pressed, the rank count decides
        self.run_key: str | None = None
        self.frames = 0
        self.first_frame_at: float | None = None
        self.last_frame_ms = 0.0
        self._nothing: tuple[float, str] = (-1e9, "")  # when "nothing readable" was said, what
        self.color = "NO_COLOR" not in os.environ
        # Makes the sampler in its own worker (NVML is initialised and called from that thread
        # only: a wedged driver delays the panel, never the app); None: no system panel.
        self.sampler = system
        self.pace = FramePace(refresh_hz, cpu_budget)  # how often charts are drawn
        self.system_rows = 6
        self._stop_sampling = threading.Event()

    def compose(self) -> ComposeResult:
        yield Header(id="header")
        with Grid(id="charts"):
            for spec in DEFAULT_CHARTS:
                yield Chart(spec, id=f"chart-{spec.key}")
        with Horizontal(id="bottom"):
            yield RanksTable(id="ranks")
            yield RunsTable(id="runs")
            yield SystemPanel(id="system")
            yield AlertsPanel(id="alerts")
        yield Footer()

    def on_mount(self) -> None:
        self.follow()
        if self.sampler is not None:
            self.sample_system()
        # Checked often, drawn at most refresh_hz times a second: new data waits at most 50 ms
        # for a frame (not a whole period), and the frame rate stays capped.
        self.set_interval(min(0.05, 1 / self.refresh_hz), self._tick)
        self.query(Chart).first().focus()
        self.call_after_refresh(self.layout_charts)

    def on_unmount(self) -> None:
        self._stop_sampling.set()
        self.workers.cancel_group(self, "follow")

    @work(thread=True, exclusive=True, exit_on_error=False, group="system", description="system")
    def sample_system(self) -> None:
        """Samples the machine once a second until the app quits (the worker makes and owns the
        sampler: NVML is called from this thread only)."""
        assert self.sampler is not None
        sampler = self.sampler()
        try:
            while True:
                self.post_message(Sampled(sampler.sample()))
                if self._stop_sampling.wait(SAMPLE_SECONDS):
                    break
        finally:
            sampler.close()

    @on(Sampled)
    def _sampled(self, message: Sampled) -> None:
        # Its size is fixed (CSS): a new text needs no layout of the screen. None while the
        # screen is taken down (a shutdown under way: the sampler still sends).
        for panel in self.query(SystemPanel):
            panel.update(frame.system_text(message.view, self.system_rows), layout=False)

    # -- the worker: owns the source, the engine and the store's writes -------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group="follow", description="follow")
    def follow(self) -> None:
        """Polls the source until the app quits; posts a snapshot and new alerts after each poll.

        Alerts over a long history come after its first frame: the run files are read again
        for them once it is painted (see :mod:`.replay`), holding nothing of it meanwhile.
        """
        worker = get_current_worker()
        source, engine, book = self.source, self.engine, self.source.book
        posted = judged = 0.0
        follower = source if isinstance(source, Follower) else None  # files, a cache
        history = None
        if engine is not None and follower is not None:
            history = HistoryAlerts(lambda b: [a for _, a in engine.feed_batch(b)], follower)
        reading = False  # a history is being read
        try:
            while not worker.is_cancelled:
                # A turn that reads, judges or caches a history is counted before its work and
                # after it, so that a frame drawn meanwhile (a key pressed) sees it too.
                if reading or self.alerts_owed:
                    self.bursts += 1
                # A replay has work every turn: the poll does not wait for live frames then.
                batch = source.poll(0.0 if history is not None and history.reading_again else 0.1)
                restored = follower.take_restored() if follower is not None else []
                if batch or restored:
                    with self.store_lock:
                        self.store.adopt(restored)
                        self.store.add(batch)
                alerts: list[Alert] = []
                now = time.monotonic()
                if engine is not None and now - judged >= HEALTH_SECONDS:
                    judged = now
                    alerts += engine.tick(book.health(now))
                # Read after the batch is in the store: the last batch of a history is drawn.
                self.catching_up = catching_up = source.catching_up
                if restored:  # a history taken whole (a cache, workers): drawn as one read ends
                    self._was_catching_up = True
                saving = bool(reading or restored) and not catching_up
                if catching_up or restored or saving or self.alerts_owed:
                    self.bursts += 1
                if history is not None:
                    alerts += history.take(batch, bool(restored))
                    self.alerts_owed = history.replaying
                    if history.owed:  # a history read to its end: paint it, then alert
                        self._painted.clear()
                        self._paint_pending = True
                        self.post_message(Polled(book.snapshot(), [], True))
                        self._painted.wait(timeout=1.0)
                        history.start()
                    alerts += history.step()
                    self.alerts_owed = history.replaying
                elif engine is not None and batch:
                    alerts += [a for _, a in engine.feed_batch(batch)]
                if follower is not None and saving:
                    follower.save_caches(self.store)  # the history read: quick to open next time
                reading = catching_up
                if catching_up or restored or saving or self.alerts_owed:
                    self.bursts += 1  # a history read, judged or cached: not the live pace
                if batch or alerts or now - posted >= SNAPSHOT_SECONDS:
                    posted = now
                    self.post_message(Polled(book.snapshot(now), alerts, bool(batch)))
                collector.reading(catching_up or self.alerts_owed)  # a history, or live
                if not batch and source.done and not self.alerts_owed:
                    time.sleep(0.1)
        finally:
            collector.reading(False)
            if history is not None:
                history.close()
            source.close()  # in this thread: the sockets are never used by two threads
            if engine is not None and hasattr(engine, "close"):
                engine.close()  # open snapshots are written

    @on(Polled)
    def _polled(self, message: Polled) -> None:
        self.runs = message.runs
        self.dirty = self.dirty or message.data
        if message.alerts:
            self.alerts.extend(message.alerts)
            del self.alerts[:-1000]
            self.dirty = True
            if self.bell_on and any(a.severity == "critical" for a in message.alerts):
                self.bell()

    def painted(self) -> None:
        """Called by a chart as it renders: once this pass ends, the frame is on the screen."""
        if self._paint_pending:
            self._paint_pending = False
            self.call_later(self._painted.set)

    # -- drawing --------------------------------------------------------------------------------

    def current_run(self) -> RunView | None:
        """The run shown: the chosen one, else the newest."""
        chosen = next((r for r in self.runs if r.key == self.run_key), None)
        return chosen or max(self.runs, key=frame.recency, default=None)

    def _tick(self) -> None:
        # While a long history is read, a frame a second shows progress; drawing more often
        # would slow the reading down (both need the one interpreter lock). The moment it is
        # all read, it is drawn, whenever the last progress frame was.
        catching_up = self.catching_up
        period = self.pace.period()
        if catching_up:
            period = max(1.0, period)
        if self._was_catching_up and not catching_up:
            period = 0.0
        self._was_catching_up = catching_up
        now = time.monotonic()
        if self.paused:  # the whole picture holds still, clock included, until p again
            return
        try:
            if now - self.drawn_at >= period and self.dirty:
                self.redraw()
            elif now - self.clock_at >= CLOCK_SECONDS:
                self.redraw_clock()
        except NoMatches:
            # The screen's widgets gone while this timer still runs is a shutdown under way
            # (Textual's test harness takes the screens down before it stops the timers);
            # anywhere else it is a fault, and says so.
            if self.is_running:
                raise

    def redraw(self, force: bool = False) -> None:
        """Redraws the visible charts, the header and the tables if something changed."""
        if self.paused and not force:
            return
        if not (self.dirty or force):
            self.redraw_clock()
            return
        started = time.perf_counter()
        self.drawn_at = time.monotonic()
        self.dirty = False
        run = self.current_run()
        if run is not None and not self.rank_mode_chosen:
            # Many ranks overlaid are a cloud of dots: their min-median-max band reads.
            self.options.rank_mode = "band" if len(run.ranks) > 4 else "overlay"
        if run is not None:
            alerted = [  # marks on the charts: what is worth a look, not info
                (a.metric, a.step)
                for a in self.alerts
                if a.key == run.key and a.step is not None and a.severity != "info"
            ]
            charts = [
                (c, c.spec, c.columns) for c in self.query(Chart) if not c.has_class("hidden")
            ]
            with self.store_lock:  # the widgets were read before: nothing of the UI inside
                pictures = frame.pictures(self.store, run, charts, self.options, alerted, self.runs)
            for chart, pic in pictures:
                chart.show(pic, self.options, self.color)
        self.redraw_clock()
        self.frames += 1
        self.last_frame_ms = (time.perf_counter() - started) * 1000
        # The poll thread's share is not learned from an interval in which it read, judged or
        # cached a history: it is busy for a while then, not as it follows, and the charts would
        # be slow for long after.
        bursts = self.bursts
        self.pace.drawn(first=self.frames == 1, steady=bursts == self._bursts_at_frame)
        self._bursts_at_frame = bursts
        if self.first_frame_at is None and self.store.points:
            self.first_frame_at = time.monotonic()

    def redraw_clock(self) -> None:
        """The header, the ranks table and the alerts: what time alone changes."""
        self.clock_at = time.monotonic()
        run = self.current_run()
        # An alert of no run (lmtop's own error) is every run's.
        shown = [a for a in self.alerts if run is not None and a.key in (run.key, "")]
        counters: dict[str, Any] = {  # info alerts are listed, not counted in the badge
            "bad_live": self.source.bad_live,
            "alerts": sum(1 for a in shown if a.severity != "info"),
            "critical": sum(1 for a in shown if a.severity == "critical"),
            "paused": self.paused,
            "reading": self.catching_up,
        }
        if run is None and not self.catching_up:
            # It lists folders on this thread: looked at every few seconds, not every second.
            said_at, said = self._nothing
            if time.monotonic() - said_at >= NOTHING_SECONDS:
                said = discovery.nothing_readable(list(getattr(self.source, "paths", [])))
                self._nothing = (time.monotonic(), said)
            counters["nothing"] = said
        now = frame.now()
        compared = frame.compared_runs(self.runs, self.options, run) if run is not None else []
        with self.store_lock:
            header = frame.header_text(self.store, run, len(self.runs), now, counters)
            rows = frame.rank_rows(self.store, run, now) if run is not None else []
            overlaid = frame.run_rows(self.store, compared, run) if run and compared else None
        self.query_one(Header).update(header, layout=False)  # one line, the screen's width
        # Runs overlaid: the table lists them (their colours, what differs), not one's ranks.
        ranks, runs = self.query_one(RanksTable), self.query_one(RunsTable)
        ranks.display, runs.display = overlaid is None, overlaid is not None
        ranks.update_rows(rows, self.table_rows)
        if overlaid is not None:
            runs.update_runs(*overlaid)
        self.query_one(AlertsPanel).update_alerts(shown)

    def _changed(self, note: str | None) -> None:
        self.dirty = True
        self.redraw(force=True)
        if note:
            self.notify(note, timeout=2, markup=False)


def frame_period(cost: float, refresh_hz: float, budget: float | None, rest: float = 0.0) -> float:
    """Seconds between chart frames: ``1 / refresh_hz``, or longer when frames of ``cost`` CPU
    seconds each, with the rest of the process taking ``rest`` of a core, would take the process
    past ``budget`` of a core (at most MAX_FRAME_SECONDS)."""
    period = 1 / refresh_hz
    if budget:
        left = budget - rest
        wanted = cost / left if left > 0 else math.inf
        period = min(max(period, wanted), max(period, MAX_FRAME_SECONDS))
    return period


class FramePace:
    """How often the charts are drawn: at most ``refresh_hz`` times a second, and no more often
    than keeps the whole process within ``budget`` of a core (None: no limit).

    Two figures are measured at each frame and smoothed: the frame's cost (the UI thread's CPU
    since the frame before: building the pictures, Textual painting them, the clock's redraws
    between) and the share of a core the rest of the process takes (the poll thread reading,
    judging and storing, the system sampler, Textual's input and output threads), a rate that
    does not depend on how often frames come. Frames then come every cost / (budget - rest)
    seconds: with 16 live ranks on the 2-core VM the poll thread takes ~4 % of a core and a frame
    at 160x48 ~130 ms, so charts move every ~1.5 s and top shows ~13 %; with 4 ranks, every
    ~1.1 s. ``clocks`` gives (UI thread CPU, process CPU, monotonic) seconds; tests pass theirs.
    """

    SMOOTHING = 0.3  # the weight of the newest frame in the frames' smoothed cost
    # The rest's share is smoothed over time, not frames, from 0: a burst in a short interval (a
    # collection, a large batch, the first poll) weighs what its duration does.
    REST_SECONDS = 5.0
    # Unsteady this long, the poll thread's work is its steady state (hundreds of ranks whose
    # files outgrow a poll's read, a history read for minutes): its share is learned then.
    UNSTEADY_SECONDS = 30.0
    # An interval longer than the slowest pace in which the UI thread took less of a core than
    # this was idle (a paused screen, nothing changed): no frame's cost.
    IDLE_SHARE = 0.1

    def __init__(
        self,
        refresh_hz: float,
        budget: float | None,
        clocks: Callable[[], tuple[float, float, float]] | None = None,
    ) -> None:
        self.refresh_hz = refresh_hz
        self.budget = budget
        self._clocks = clocks or (
            lambda: (time.thread_time(), time.process_time(), time.monotonic())
        )
        self.cost = 0.0  # the UI thread's CPU seconds per frame, smoothed (0: none measured)
        self.rest = 0.0  # the rest of the process's share of a core, smoothed
        self._at = self._clocks()
        self._unsteady_since: float | None = None  # when the intervals stopped being steady

    def period(self) -> float:
        """Seconds from one chart frame to the next, as things stand."""
        return frame_period(self.cost, self.refresh_hz, self.budget, self.rest)

    def drawn(self, first: bool = False, steady: bool = True) -> None:
        """A frame was drawn. ``first``: the app's first (its interval was the start-up);
        ``steady``: the rest of the process took its usual share since the frame before (no
        history being read or judged meanwhile, which would slow the charts long after)."""
        at = self._clocks()
        (ui, process, wall), (ui_before, process_before, wall_before) = at, self._at
        self._at = at
        elapsed, spent = wall - wall_before, ui - ui_before
        if first or elapsed <= 0:
            return
        # Longer than the slowest pace with the UI thread nearly idle: nothing changed for a
        # while (a paused screen, a finished run), and the clock's redraws meanwhile are no
        # frame's cost. (A frame that itself took that long kept the thread busy: it is learned.)
        if elapsed > 2 * MAX_FRAME_SECONDS and spent < self.IDLE_SHARE * elapsed:
            return
        weight = self.SMOOTHING
        self.cost = spent if not self.cost else (1 - weight) * self.cost + weight * spent
        if steady:
            self._unsteady_since = None
        else:
            if self._unsteady_since is None:
                self._unsteady_since = wall_before
            if wall - self._unsteady_since < self.UNSTEADY_SECONDS:
                return
        rest = max(0.0, (process - process_before) - spent) / elapsed
        weight = 1 - math.exp(-elapsed / self.REST_SECONDS)
        self.rest = (1 - weight) * self.rest + weight * rest


def open_source(paths: Sequence[str], follow: bool, settings: AlertSettings) -> Follower:
    """The viewer's follower, made before the app runs: a long history with no cache has its
    reader processes started now, forked while this process has one thread."""
    return Follower(
        paths,
        follow=follow,
        stall=settings.stall,
        straggler=settings.straggler,
        cache=True,  # rank-N.cols beside the run files: a history reopened in a second
        readers=os.cpu_count() or 1,  # worker processes reading long rank files
    )


def run_app(
    paths: Sequence[str],
    follow: bool = True,
    refresh_hz: float = REFRESH_HZ,
    settings: AlertSettings | None = None,
) -> int:
    """Opens the viewer on ``paths`` (or this user's live runs) until the user quits.

    ``settings`` configures the alerts (default: the documented defaults).
    """
    from .alert_actions import Alerting

    settings = settings if settings is not None else AlertSettings()
    source = open_source(paths, follow, settings)
    alerting = Alerting(settings, source.runs)
    app = LmtopApp(
        source, refresh_hz=refresh_hz, alerts=alerting, system=Sampler, cpu_budget=CPU_BUDGET
    )
    app.run()
    return app.return_code or 0
