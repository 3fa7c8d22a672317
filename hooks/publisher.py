"""One rank's publisher: appends every message to the run directory, then offers it live.

The order matters. A message is written to ``rank-<N>.jsonl`` (a write to the OS, not an fsync)
before :meth:`Publisher.publish` returns, so a ``kill -9`` loses nothing already published. The
live copy goes to a ZeroMQ PUB socket from a small sender thread that coalesces the messages of a
few milliseconds into one frame: waking ZeroMQ's I/O thread costs tens of microseconds, and
paying it once per window instead of once per step keeps ``publish`` in single microseconds.
The socket never blocks (a bounded high-water mark, then drops that a viewer fills from the file)
and has LINGER 0, so no viewer, however frozen, can delay the exit of a training process.

CUDA tensors take a detour that keeps the host from waiting on the device (``tensors.py``): their
message is queued, in order, until its values have landed in pinned host memory, and is written
(and numbered) at a later call once the copy is done, or at ``finish``.

In a launch that spans nodes, local rank 0's publisher also runs its node's relay, and global
rank 0's the aggregator that takes every other node's ranks (``relay.py``, ``aggregator.py``).

Nothing here raises into the training loop: every problem is counted and reported once on stderr.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import registry, relay, schema, tensors
from ._version import __version__
from .identity import Identity
from .redaction import REDACTED, redact_argv, secret_name

# Live sends are coalesced over this window; a viewer sees a step at most this much later.
COALESCE_SECONDS = 0.005
# Frames (batches) a PUB socket queues per viewer before dropping; the viewer fills from the file.
SEND_HWM = 2000
# How long finish() waits for the sender thread to hand over the last frame.
CLOSE_TIMEOUT = 0.2
MAX_TEXT_CHARS = 4096
# How long finish() waits for the GPU values of queued messages before dropping them.
FINISH_TENSOR_TIMEOUT = 0.5
# Messages queued behind GPU copies; past this, publish waits for the oldest copy. The CPU runs
# this far ahead of the GPU only in a loop that never synchronises at all.
MAX_QUEUED = 4096
# Run directories and files are the user's alone unless LMTOP_SHARE=group opens them to the group.
PRIVATE_MODES = (0o700, 0o600)
GROUP_MODES = (0o750, 0o640)


def share_modes(problems: Problems | None = None) -> tuple[int, int]:
    """The (directory, file) modes of new run directories and files, from ``$LMTOP_SHARE``."""
    share = os.environ.get("LMTOP_SHARE", "").strip().lower()
    if share == "group":
        return GROUP_MODES
    if share not in ("", "none", "private", "user") and problems is not None:
        problems("LMTOP_SHARE must be 'group' or unset; run files stay private", share[:40])
    return PRIVATE_MODES


class Problems:
    """Counts what went wrong, and says each kind of problem once on stderr."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str, detail: object = "") -> None:
        first = kind not in self.counts
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if first:
            try:
                print(
                    f"lmtop: {kind}: {detail} (reported once; later ones are counted)",
                    file=sys.stderr,
                    flush=True,
                )
            except Exception:
                pass


class LiveSender:
    """Owns the ZeroMQ PUB socket; a daemon thread sends coalesced frames of JSON lines."""

    def __init__(self, endpoint: str, problems: Problems) -> None:
        import zmq  # pyzmq is light, but not needed by a disabled hook

        self._zmq = zmq
        self.endpoint = endpoint
        self._problems = problems
        self._context = zmq.Context(io_threads=1)
        sock = self._context.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)
            self._context.term()
            raise
        self._socket = sock
        self._lock = threading.Lock()
        self._pending: list[bytes] = []
        self._armed = False
        self._closing = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmtop-live", daemon=True)
        self._thread.start()

    def put(self, line: bytes) -> None:
        """Queues one encoded line; wakes the sender once per coalescing window."""
        with self._lock:
            self._pending.append(line)
            if self._armed:
                return
            self._armed = True
        self._wake.set()

    def _run(self) -> None:
        zmq = self._zmq
        while True:
            self._wake.wait()
            if not self._closing:
                time.sleep(COALESCE_SECONDS)
            with self._lock:
                batch, self._pending = self._pending, []
                self._armed = False
                self._wake.clear()
                closing = self._closing
            if batch:
                try:
                    self._socket.send(b"".join(batch), zmq.NOBLOCK)
                except zmq.Again:
                    self._problems(
                        "live frames dropped (a slow viewer; it reads them from the file)"
                    )
                except Exception as exc:
                    self._problems("live send failed", exc)
            if closing:
                break
        self._socket.close(linger=0)

    def close(self) -> None:
        """Sends what is queued and closes; never waits on a viewer."""
        with self._lock:
            self._closing = True
        self._wake.set()
        self._thread.join(CLOSE_TIMEOUT)
        if not self._thread.is_alive():
            self._context.term()  # every socket is closed: returns at once


class Publisher:
    """The messages of one rank of one run: numbering, the run file, the live socket."""

    def __init__(
        self,
        run: str,
        who: Identity,
        directory: Path,
        config: Mapping[str, Any] | None = None,
        live: bool = True,
    ) -> None:
        self.problems = Problems()
        self.who = who
        self.rank, self.world = who.rank, who.world
        self.pid = os.getpid()
        self.forked = False
        self.finished = False
        self._closed = False
        self.seq = 0
        self.step = -1
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._torn = False  # a short write left a partial line: start the next on a new line
        self._live: LiveSender | None = None
        self._entry: Path | None = None
        self._relay: relay.Relay | relay.Aggregator | None = None
        # Messages waiting for the GPU values of an earlier one: (kind, step, t, fields, transfer).
        self._queue: deque[tuple[str, int, float, dict[str, Any], tensors.Transfer | None]] = (
            deque()
        )
        self.run = self._open(run, directory)
        if live:
            self._start_live()
        self._emit(schema.START, None, {"info": self._info(config)})
        if live and self.path is not None and who.launched:
            self._relay = relay.start(self.dir, self.run, who, self.problems, share_modes()[1])

    # -- set-up ---------------------------------------------------------------------------------

    def _open(self, run: str, directory: Path) -> str:
        """Opens ``<directory>/<name>/rank-<N>.jsonl``; returns the name, decided once per launch.

        Every rank of a launch must agree on the name without talking to the others. A run
        directory is claimed for a launch as it appears (with its ``.launch`` file, see
        :func:`_claim`); when ``run`` is taken by another launch, every rank goes on to the same
        ``<run>-<launch id>`` (then ``-2``, ``-3``, ...), never to a counter that ranks race for.
        """
        dir_mode, file_mode = share_modes(self.problems)
        launch = self.who.launch or f"{socket.gethostname()}-{self.pid}"
        suffixed = (f"{run}-{launch[:6]}" + (f"-{n}" if n > 1 else "") for n in range(1, 10_000))
        for name in itertools.chain([run], suffixed):
            path = directory / name / schema.rank_file(self.rank)
            try:
                if not _claim(path.parent, launch, dir_mode):
                    continue  # another launch's run
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
                self._fd = os.open(path, flags, file_mode)
                os.fchmod(self._fd, file_mode)  # exactly: the umask may differ from the choice
                self.path: Path | None = path
                self.dir = path.parent
                return name
            except FileExistsError:
                continue  # this rank of the same launch key ran before (a reused rendezvous id)
            except OSError as exc:
                self.problems("cannot write the run directory; publishing live only", exc)
                break
        else:
            self.problems("no free run name; publishing live only", run)
        self.path = None
        self.dir = directory / run  # where it would be: a viewer keys the run by it
        return run

    def _start_live(self) -> None:
        try:
            runtime = registry.runtime_dir()
            endpoint = f"ipc://{runtime}/{self.pid}.sock"
            self._live = LiveSender(endpoint, self.problems)
            self._entry = registry.register(
                {
                    "pid": self.pid,
                    "start_ticks": registry.process_start_ticks(self.pid),
                    "host": socket.gethostname(),
                    "run": self.run,
                    "rank": self.rank,
                    "world": self.world,
                    "dir": str(self.dir),
                    "live_only": self.path is None,
                    "endpoint": endpoint,
                    "started": time.time(),
                }
            )
        except Exception as exc:
            self.problems("live view unavailable; the run file still records everything", exc)

    def _info(self, config: Mapping[str, Any] | None) -> dict[str, Any]:
        info: dict[str, Any] = {
            "host": socket.gethostname(),
            "pid": self.pid,
            "argv": redact_argv([str(arg) for arg in sys.argv]),
            "cwd": os.getcwd(),
            "world": self.world,
            "rank": self.rank,
            "local_rank": self.who.local_rank,
            "lmtop": __version__,
            "protocol": schema.PROTOCOL_VERSION,
            "python": sys.version.split()[0],
            "start_ticks": registry.process_start_ticks(self.pid),
            "launch": self.who.launch,
        }
        if config is not None:
            info["config"] = _plain(config)
            if len(schema.encode(info["config"])) > schema.MAX_MESSAGE_BYTES // 2:
                self.problems("config over 32 KiB left out of the start message", self.run)
                info["config"] = {"_dropped": "config over 32 KiB"}
        return info

    # -- the hot path ---------------------------------------------------------------------------

    def publish(self, metrics: Any, step: Any = None) -> None:
        """Records one step's metrics. Never raises, never blocks on a viewer."""
        try:
            if self.forked or self.finished:
                self._refuse()
                return
            if type(metrics) is not dict:
                if not isinstance(metrics, Mapping):
                    self.problems("publish() needs a dict of metrics; got", type(metrics).__name__)
                    return
                metrics = dict(metrics)
            clean: dict[str, Any] = {}
            later: list[tuple[str, Any]] | None = None  # CUDA tensors, read once copied
            for name, value in metrics.items():
                kind = type(value)
                if kind is float:
                    if value - value != 0.0:
                        value = schema.finite_or_token(value)
                elif kind is not int or not -(1 << 63) <= value < (1 << 64):
                    if later is None:
                        later = []
                    self._add_slow(clean, name, value, 0, later)
                    continue
                if type(name) is not str or len(name) > schema.MAX_NAME_CHARS:
                    if later is None:
                        later = []
                    self._add_slow(clean, name, value, 0, later)
                    continue
                clean[name] = value
            if len(clean) > schema.MAX_METRICS:
                self.problems("metrics over the limit of 1000 per message dropped", len(clean))
                clean = dict(list(clean.items())[: schema.MAX_METRICS])
                if later:
                    later = [(name, value) for name, value in later if name in clean]
            if later:
                self._emit(schema.METRICS, step, {"m": clean}, self._transfer(clean, later))
            else:
                self._emit(schema.METRICS, step, {"m": clean})
        except Exception as exc:
            self.problems("publish failed", repr(exc)[:200])

    def _add_slow(
        self, out: dict[str, Any], name: Any, value: Any, depth: int, later: list[tuple[str, Any]]
    ) -> None:
        """Everything but plain finite floats and ints: other numbers, tensors, dicts, garbage.

        A one-element CUDA tensor keeps its place in ``out`` (as None) and goes to ``later``.
        """
        if type(name) is not str:
            name = str(name)
        if len(name) > schema.MAX_NAME_CHARS:
            self.problems("metric names over 200 characters dropped", name[:40] + "...")
            return
        if isinstance(value, Mapping):
            if depth >= 4:
                self.problems("metrics nested deeper than 4 dicts dropped", name)
                return
            for key, inner in value.items():
                self._add_slow(out, f"{name}/{key}", inner, depth + 1, later)
            return
        if tensors.device_tensor(value):
            if value.numel() == 1:
                out[name] = None
                later.append((name, value))
            else:
                self.problems("metrics that are not numbers dropped", f"{name}=tensor")
            return
        try:
            number = schema.number(value)
        except Exception:
            number = None
        if number is None:
            self.problems("metrics that are not numbers dropped", f"{name}={type(value).__name__}")
            return
        out[name] = number

    def event(self, text: Any, step: Any = None, data: Mapping[str, Any] | None = None) -> None:
        """Records a free-text event (checkpoint saved, evaluation done, ...)."""
        try:
            if self.forked or self.finished:
                self._refuse()
                return
            fields: dict[str, Any] = {"text": str(text)[:MAX_TEXT_CHARS]}
            if data:
                fields["data"] = _plain(data)
            self._emit(schema.EVENT, step, fields)
        except Exception as exc:
            self.problems("event failed", repr(exc)[:200])

    def _transfer(
        self, clean: dict[str, Any], later: list[tuple[str, Any]]
    ) -> tensors.Transfer | None:
        """Starts the copies of a message's CUDA values; reads them directly if CUDA refuses."""
        try:
            return tensors.Transfer(later)
        except Exception as exc:
            self.problems("CUDA values read with a synchronisation (no async copy)", repr(exc))
        for name, value in later:
            try:
                clean[name] = schema.number(value)
            except Exception:
                clean[name] = None
            if clean[name] is None:
                del clean[name]
        return None

    def _emit(
        self,
        kind: str,
        step: Any,
        fields: dict[str, Any],
        transfer: tensors.Transfer | None = None,
    ) -> None:
        with self._lock:
            if self.finished:  # a publish that raced finish(): nothing after the end
                self._refuse()
                return
            if kind == schema.END:
                self.finished = True
            # The step is the caller's, now; the seq is the line's, when it is written.
            if step is None:
                step = min(self.step + (kind == schema.METRICS), schema.MAX_STEP)
            else:
                if type(step) is not int:
                    step = self._step(step)
                if not 0 <= step <= schema.MAX_STEP:
                    self.problems(
                        "steps outside [0, 2**63) replaced by the next step", repr(step)[:40]
                    )
                    step = min(self.step + (kind == schema.METRICS), schema.MAX_STEP)
            if kind == schema.METRICS or step > self.step:
                self.step = step
            if self._queue or transfer is not None:
                self._queue.append((kind, step, time.time(), fields, transfer))
                self._drain()
                return
            self._write_message(kind, step, time.time(), fields)

    def _write_message(self, kind: str, step: int, t: float, fields: dict[str, Any]) -> None:
        message = {
            "v": schema.PROTOCOL_VERSION,
            "run": self.run,
            "rank": self.rank,
            "world": self.world,
            "seq": self.seq,
            "t": t,
            "kind": kind,
            "step": step if step >= 0 else None,
            **fields,
        }
        try:
            line = schema.encode(message)
        except Exception as exc:
            retried = self._encode_without_bad_names(message)
            if retried is None:
                self.problems("messages that cannot be encoded dropped", repr(exc)[:200])
                return
            line = retried
        if len(line) > schema.MAX_MESSAGE_BYTES:
            self.problems("messages over 64 KiB dropped", f"{len(line)} bytes")
            return
        self.seq += 1
        self._write(line)
        if self._live is not None:
            self._live.put(line)

    def _encode_without_bad_names(self, message: dict[str, Any]) -> bytes | None:
        """The message without the metric names that are not valid UTF-8 (lone surrogates):
        one bad name costs that metric, not the message. None when that was not the trouble."""
        metrics = message.get("m")
        if type(metrics) is not dict:
            return None
        good = {}
        for name, value in metrics.items():
            try:
                name.encode()
            except UnicodeEncodeError:
                self.problems("metric names that are not valid UTF-8 dropped", ascii(name)[:40])
                continue
            good[name] = value
        if len(good) == len(metrics):
            return None
        try:
            return schema.encode({**message, "m": good})
        except Exception:
            return None

    def _drain(self, wait: float = 0.0) -> None:
        """Writes the queued messages whose values have landed, oldest first (holds the lock).

        With ``wait``, waits that long in all for the copies, then drops what has not landed.
        """
        queue = self._queue
        deadline = time.monotonic() + wait
        while queue:
            kind, step, t, fields, transfer = queue[0]
            if transfer is not None:
                landed = transfer.ready()
                if not landed and (wait or len(queue) > MAX_QUEUED):
                    remaining = deadline - time.monotonic() if wait else FINISH_TENSOR_TIMEOUT
                    landed = transfer.wait(max(0.0, remaining))
                if not landed:
                    if not wait:
                        return
                    self.problems("metrics whose GPU values never landed dropped", f"step {step}")
                    queue.popleft()
                    continue
                try:
                    fields["m"].update(transfer.values())
                except Exception as exc:
                    self.problems("GPU values that could not be read dropped", repr(exc)[:200])
                    fields["m"] = {k: v for k, v in fields["m"].items() if v is not None}
            queue.popleft()
            self._write_message(kind, step, t, fields)

    def flush(self, timeout: float = 0.0) -> None:
        """Writes the messages whose GPU values have landed; with ``timeout``, waits for them."""
        try:
            with self._lock:
                if self._queue and not self.forked:
                    self._drain(timeout)
        except Exception as exc:
            self.problems("flush failed", repr(exc)[:200])

    @property
    def queued(self) -> int:
        """Messages waiting for the GPU values of an earlier or their own message."""
        return len(self._queue)

    def _step(self, step: Any) -> int:
        value = schema.number(step)
        if type(value) is int:
            return value
        if type(value) is float and value == int(value):  # finite: the others are tokens
            return int(value)
        self.problems("step must be an integer; using the next step instead", repr(step)[:40])
        return self.step + 1

    def _write(self, line: bytes) -> None:
        if self._fd is None:
            return
        if self._torn:
            line = b"\n" + line
        written = 0
        try:
            written = os.write(self._fd, line)
            if written < len(line):
                written += os.write(self._fd, line[written:])
        except OSError as exc:
            self.problems("cannot write the run file; messages only go live", exc)
        else:
            if written < len(line):
                self.problems("cannot write the run file; messages only go live", "short write")
        # A line cut short (the disk filled mid-line, then refused the rest) leaves the file
        # without its newline: the next line to land must start on a line of its own.
        if written:
            self._torn = written < len(line)

    def _refuse(self) -> None:
        if self.forked:
            self.problems(
                "publish() in a forked child is ignored (publish from the training process)",
                f"pid {os.getpid()}",
            )
        else:
            self.problems("publish() after finish() is ignored", self.run)

    # -- the end --------------------------------------------------------------------------------

    def finish(self, status: str = "ok", error: str | None = None) -> None:
        """Writes the ``end`` message and closes the file, the socket and the registry entry."""
        if self.forked or self.finished:
            return
        self.flush(FINISH_TENSOR_TIMEOUT)
        try:
            fields: dict[str, Any] = {"status": str(status)[:40]}
            if error:
                fields["error"] = str(error)[:MAX_TEXT_CHARS]
            if self.problems.counts:
                fields["problems"] = dict(self.problems.counts)
            self._emit(schema.END, None, fields)
        except Exception:
            pass
        with self._lock:
            self.finished = True
            if self._closed:  # another thread's finish() is closing
                return
            self._closed = True
        if self._relay is not None:
            try:
                self._relay.close()  # the last lines to (or from) the other nodes, bounded
            except Exception:
                pass
        if self._entry is not None:
            registry.mark_ended(self._entry)
        if self._live is not None:
            try:
                self._live.close()
            except Exception:
                pass
            registry.unregister(Path(self._live.endpoint.removeprefix("ipc://")))
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def after_fork_in_child(self) -> None:
        """A forked child shares the parent's file and socket: it must touch neither."""
        self.forked = True


LAUNCH_FILE = ".launch"


def _claim(run_dir: Path, launch: str, mode: int) -> bool:
    """Whether ``run_dir`` belongs to ``launch``, creating it for ``launch`` when it is free.

    The directory is built under a temporary name with its ``.launch`` file, then renamed into
    place, so no rank ever sees the run directory without its owner. A directory without the
    file (an older lmtop's, or the user's) belongs to another launch.
    """
    marker = run_dir / LAUNCH_FILE
    if not run_dir.exists():
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = run_dir.parent / f".{run_dir.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        os.mkdir(tmp, mode)
        try:
            os.chmod(tmp, mode)  # exactly: the umask may differ from the choice
            fd = os.open(tmp / LAUNCH_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o666)
            try:
                os.write(fd, launch.encode())
            finally:
                os.close(fd)
            try:
                os.rename(tmp, run_dir)
                return True
            except OSError:
                pass  # another rank (or launch) was first: read whose it is
        finally:
            if tmp.exists():
                (tmp / LAUNCH_FILE).unlink(missing_ok=True)
                tmp.rmdir()
    try:
        return marker.read_bytes().decode(errors="replace") == launch
    except OSError:
        return False  # none (an older lmtop's or the user's directory), or not readable


def _plain(value: Any, depth: int = 0, secret: bool = False) -> Any:
    """A JSON-safe copy of a config: numbers, strings, lists and dicts; other things as text.

    Text under a key that names a credential (``secret``) is written as ``***``.
    """
    if value is None or type(value) in (bool, int):
        return value
    if type(value) is str:
        return REDACTED if secret else value
    if type(value) is float:
        return schema.finite_or_token(value)
    if depth > 8:
        return REDACTED if secret else str(value)[:200]
    if isinstance(value, Mapping):
        return {
            str(k)[:200]: _plain(v, depth + 1, secret or secret_name(str(k)))
            for k, v in list(value.items())[:2000]
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, depth + 1, secret) for v in list(value)[:2000]]
    try:
        number = schema.number(value)
    except Exception:
        number = None
    if number is not None:
        return number
    return REDACTED if secret else str(value)[:1000]
