"""Issue 14: a shared GPU box, racing threads and hostile files lose nothing and run nothing.

Another local user is played by uid 65534 (``nobody``): the tests that hand files to it need
root (they are skipped otherwise); the rest run as anyone.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import viewer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lmtop.hooks import schema
from lmtop.tui import alert_settings
from runs import line

NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="handing a file to another user")


def python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Runs ``code`` in a fresh interpreter (in ``env``, else this process's environment);
    returns its stdout, failing with its stderr."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ if env is None else env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in path.read_bytes().splitlines()]


# -- 1. a planted lmtop.toml runs nothing ------------------------------------------------------


def _nan_run(folder: Path) -> Path:
    run = folder / "job"
    run.mkdir(parents=True)
    (run / "rank-0.jsonl").write_bytes(
        line("job", 0, 1, 0, "start", None, 1.0, info={})
        + line("job", 0, 1, 1, "metrics", 0, 2.0, m={"loss": "NaN"})
        + line("job", 0, 1, 2, "end", 0, 3.0, status="ok")
    )
    return run


def test_a_planted_config_beside_the_data_sets_thresholds_but_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    runs = tmp_path / "shared"
    run = _nan_run(runs)
    pwned = tmp_path / "pwned"
    (runs / "lmtop.toml").write_text(f'on_alert = "touch {pwned}"\n[spike]\ntail_threshold = 9\n')
    watcher = viewer("--no-follow", str(run))
    _, stderr = watcher.communicate(timeout=60)
    assert watcher.returncode == 2  # the NaN alert fired ...
    assert b"on_alert ignored" in stderr
    time.sleep(0.3)
    assert not pwned.exists()  # ... and the planted command did not run
    settings_ = alert_settings.load([str(run)])
    assert settings_.on_alert is None and settings_.spike.tail_threshold == 9.0


def _own_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    """The user's own lmtop.toml, under a private $XDG_CONFIG_HOME."""
    home = tmp_path / "home"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    (home / "lmtop").mkdir(parents=True)
    own = home / "lmtop" / "lmtop.toml"
    own.write_text(text)
    return own


def test_commands_come_from_the_users_own_file_config_or_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _own_config(tmp_path, monkeypatch, 'on_alert = "notify-send lmtop"\n')
    assert alert_settings.load([]).on_alert == "notify-send lmtop"
    explicit = tmp_path / "team.toml"
    explicit.write_text('[alerts]\non_alert = "mail me"\n')
    assert alert_settings.load([], config=str(explicit)).on_alert == "mail me"
    assert alert_settings.load([], overrides=["on_alert=echo"]).on_alert == "echo"


def test_a_config_writable_by_others_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    own = _own_config(tmp_path, monkeypatch, 'on_alert = "echo"\n')
    own.chmod(0o666)
    with pytest.raises(alert_settings.SettingsError, match="writable by group or others"):
        alert_settings.load([])
    with pytest.raises(alert_settings.SettingsError, match="writable by group or others"):
        alert_settings.load([], config=str(own))
    own.unlink()
    beside = tmp_path / "runs"
    beside.mkdir()
    (beside / "lmtop.toml").write_text("[spike]\ntail_threshold = 9\n")
    (beside / "lmtop.toml").chmod(0o620)
    assert alert_settings.load([str(beside)]).spike.tail_threshold == 4.5  # skipped, with a note
    assert "writable by group or others" in capfd.readouterr().err
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(alert_settings.SettingsError, match="not a regular file"):
        alert_settings.load([], config=str(fifo))  # and it did not hang


@needs_root
def test_a_config_owned_by_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    theirs = tmp_path / "theirs.toml"
    theirs.write_text('on_alert = "echo"\n')
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(alert_settings.SettingsError, match="owned by uid 65534"):
        alert_settings.load([], config=str(theirs))
    beside = tmp_path / "runs"
    beside.mkdir()
    (beside / "lmtop.toml").write_text("[spike]\ntail_threshold = 9\n")
    os.chown(beside / "lmtop.toml", NOBODY, NOBODY)
    assert alert_settings.load([str(beside)]).spike.tail_threshold == 4.5
    assert "owned by uid 65534" in capfd.readouterr().err


# -- 2. the registry: every candidate, none of another user's -----------------------------------

LIVE_JOB = """
import sys
from lmtop import hooks
hooks.init(run=sys.argv[1])
hooks.publish({"x": 1.0}, step=0)
print("up", flush=True)
sys.stdin.read()
"""
LIST_ENTRIES = (
    "import json; from lmtop.hooks import registry; print(json.dumps(registry.live_entries()))"
)


def _job(run: str, env: dict[str, str]) -> subprocess.Popen[str]:
    job = subprocess.Popen(
        [sys.executable, "-c", LIVE_JOB, run],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert job.stdout is not None and job.stdout.readline() == "up\n"
    return job


@pytest.fixture
def short_dir() -> Iterator[Callable[[], Path]]:
    """Makes directories with short paths (ipc socket paths are limited to about 100 bytes)."""
    import shutil
    import tempfile

    made: list[Path] = []

    def make() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="lt", dir="/tmp")))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def test_the_viewer_finds_a_job_started_without_xdg_runtime_dir(
    short_dir: Callable[[], Path], lmtop_env: dict[str, str]
) -> None:
    xdg, tmp = short_dir(), short_dir()
    base = {
        k: v for k, v in os.environ.items() if k not in ("LMTOP_RUNTIME_DIR", "XDG_RUNTIME_DIR")
    }
    cron = _job("cron", dict(base, TMPDIR=str(tmp)))  # registers under $TMPDIR/lmtop-<uid>
    session = _job("session", dict(base, TMPDIR=str(tmp), XDG_RUNTIME_DIR=str(xdg)))
    try:
        assert (tmp / f"lmtop-{os.getuid()}" / f"{cron.pid}.json").exists()
        assert (xdg / "lmtop" / f"{session.pid}.json").exists()
        entries = json.loads(
            python(LIST_ENTRIES, dict(base, TMPDIR=str(tmp), XDG_RUNTIME_DIR=str(xdg)))
        )
        # /tmp/lmtop-<uid> is always a candidate too: this user's other live jobs may be there.
        ours = [e for e in entries if e["pid"] in (cron.pid, session.pid)]
        assert sorted(e["run"] for e in ours) == ["cron", "session"]
        assert {"pid", "start_ticks", "run", "rank", "dir", "endpoint", "host", "started"} <= set(
            ours[0]
        )
    finally:
        for job in (cron, session):
            job.communicate(timeout=30)


@needs_root
def test_a_runtime_directory_of_another_user_is_not_read(
    tmp_path: Path, short_dir: Callable[[], Path], lmtop_env: dict[str, str]
) -> None:
    tmp = short_dir()
    base = {
        k: v for k, v in os.environ.items() if k not in ("LMTOP_RUNTIME_DIR", "XDG_RUNTIME_DIR")
    }
    env = dict(base, TMPDIR=str(tmp))
    planted = tmp / f"lmtop-{os.getuid()}"
    planted.mkdir(mode=0o700)
    victim = _job("victim", dict(os.environ))  # a real live process the attacker points at
    try:
        entry = {
            "pid": victim.pid,
            "start_ticks": None,
            "run": "injected",
            "rank": 0,
            "dir": str(tmp_path),
            "endpoint": f"ipc://{planted}/evil.sock",
        }
        (planted / f"{victim.pid}.json").write_bytes(orjson.dumps(entry))

        def listed() -> list[str]:  # this user's other live jobs (in /tmp/lmtop-<uid>) aside
            return [
                e["run"] for e in json.loads(python(LIST_ENTRIES, env)) if e["pid"] == victim.pid
            ]

        os.chown(planted, NOBODY, NOBODY)
        assert listed() == []
        os.chown(planted, os.getuid(), os.getgid())
        planted.chmod(0o777)  # ours, but open to everyone: anyone could have planted the entry
        assert listed() == []
        planted.chmod(0o700)
        assert listed() == ["injected"]
    finally:
        victim.communicate(timeout=30)


def test_a_rank_publishing_live_only_registers_the_directory_it_would_use(
    tmp_path: Path, lmtop_env: dict[str, str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    job = _job("liveonly", dict(os.environ, LMTOP_DIR=str(blocker / "runs")))
    try:
        (entry,) = [e for e in json.loads(python(LIST_ENTRIES)) if e["pid"] == job.pid]
        assert entry["dir"] == str(blocker / "runs" / "liveonly") and entry["live_only"] is True
    finally:
        job.communicate(timeout=30)


# -- 3. alert snapshots never follow a symlink -------------------------------------------------


def _view_once(run: Path) -> None:
    watcher = viewer("--no-follow", str(run))
    watcher.communicate(timeout=60)
    assert watcher.returncode == 2  # the NaN's critical alert: a snapshot is due


def test_alert_snapshots_are_written_into_the_run_directory(tmp_path: Path) -> None:
    run = _nan_run(tmp_path / "runs")
    _view_once(run)
    (snapshot,) = (run / "alerts").iterdir()
    assert snapshot.name == "nonfinite-rank0-step0.jsonl"
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600
    assert orjson.loads(snapshot.read_bytes().splitlines()[0])["type"] == "nonfinite"


def test_alert_snapshots_never_write_through_a_symlink(tmp_path: Path) -> None:
    home = tmp_path / "victim-home"
    home.mkdir()
    bashrc = home / ".bashrc"
    bashrc.write_text("# mine\n")
    run = _nan_run(tmp_path / "runs")
    (run / "alerts").symlink_to(home)  # a symlinked alerts directory
    _view_once(run)
    assert sorted(p.name for p in home.iterdir()) == [".bashrc"]
    (run / "alerts").unlink()
    (run / "alerts").mkdir()
    (run / "alerts" / "nonfinite-rank0-step0.jsonl").symlink_to(bashrc)  # a symlinked file
    _view_once(run)
    assert bashrc.read_text() == "# mine\n"


@needs_root
def test_alert_snapshots_go_only_into_run_directories_of_the_viewer(tmp_path: Path) -> None:
    run = _nan_run(tmp_path / "runs")
    os.chown(run, NOBODY, NOBODY)
    _view_once(run)
    assert not (run / "alerts").exists()
    os.chown(run, os.getuid(), os.getgid())
    (run / "alerts").mkdir()
    os.chown(run / "alerts", NOBODY, NOBODY)
    _view_once(run)
    assert list((run / "alerts").iterdir()) == []


# -- 4. run files are the user's, and hold no secrets ------------------------------------------


def _one_run(env: dict[str, str] | None = None) -> Path:
    python(
        "from lmtop import hooks; hooks.init(run='private'); hooks.publish({'x': 1.0}); hooks.finish()",
        dict(os.environ, **(env or {})),
    )
    return Path(os.environ["LMTOP_DIR"]) / "private"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_run_files_are_private_by_default(lmtop_env: dict[str, str]) -> None:
    run = _one_run()
    assert (_mode(run), _mode(run / "rank-0.jsonl")) == (0o700, 0o600)
    if os.getuid() == 0:  # another user cannot read it
        other = subprocess.run(["cat", str(run / "rank-0.jsonl")], user=NOBODY, capture_output=True)
        assert other.returncode != 0 and b"Permission denied" in other.stderr


def test_lmtop_share_group_opens_runs_to_the_group(lmtop_env: dict[str, str]) -> None:
    run = _one_run({"LMTOP_SHARE": "group"})
    assert (_mode(run), _mode(run / "rank-0.jsonl")) == (0o750, 0o640)


secrets_ = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEF0123456789", min_size=16, max_size=40)
secret_names = st.sampled_from(
    ["hf_token", "HF_TOKEN", "api_key", "wandb-api-key", "ApiSecret", "db_password", "passwd"]
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(secret=secrets_, name=secret_names, form=st.sampled_from(["=", " ", "hydra", "config"]))
def test_secrets_never_reach_the_run_file(
    lmtop_env: dict[str, str], secret: str, name: str, form: str
) -> None:
    from lmtop import hooks

    argv = {
        "=": [f"--{name}={secret}"],
        " ": [f"--{name}", secret],
        "hydra": [f"+trainer.{name}={secret}"],
        "config": [],
    }[form]
    config = {"lr": 1e-4, "num_key_value_heads": 8, "nested": {name: secret, "list": [1]}}
    if form == "config":
        config[name] = [secret, "other"]
    old_argv = sys.argv
    sys.argv = ["train.py", "--lr", "1e-4", *argv, "--epochs", "3"]
    try:
        run = hooks.init(config=config)
        hooks.finish()
    finally:
        sys.argv = old_argv
    assert run is not None
    raw = (Path(lmtop_env["LMTOP_DIR"]) / run / "rank-0.jsonl").read_bytes()
    assert secret.encode() not in raw
    info = orjson.loads(raw.splitlines()[0])["info"]
    assert info["argv"][:3] == ["train.py", "--lr", "1e-4"] and info["argv"][-2:] == [
        "--epochs",
        "3",
    ]
    assert "***" in json.dumps(info["argv"]) or form == "config"
    assert info["config"]["nested"][name] == "***" and info["config"]["num_key_value_heads"] == 8


# -- 6. threads racing their first publish() ---------------------------------------------------

RACE = """
import json, sys, threading
from lmtop import hooks
threads, steps = int(sys.argv[1]), int(sys.argv[2])
barrier = threading.Barrier(threads)
def loop(k):
    barrier.wait()
    for step in range(steps):
        hooks.publish({f"t{k}": float(step)}, step=step)
workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
print(json.dumps(hooks.stats()))
"""


def _race(threads: int, steps: int) -> tuple[list[Path], list[dict[str, Any]]]:
    folder = Path(os.environ["LMTOP_DIR"])
    before = set(folder.glob("*")) if folder.exists() else set()
    subprocess.run([sys.executable, "-c", RACE, str(threads), str(steps)], check=True, timeout=120)
    runs = sorted(set(folder.glob("*")) - before)
    return runs, [m for run in runs for m in lines_of(run / "rank-0.jsonl")]


def test_threads_racing_their_first_publish_give_one_run_and_every_message(
    lmtop_env: dict[str, str],
) -> None:
    runs, messages = _race(4, 20_000)
    assert len(runs) == 1
    metrics = [m for m in messages if m["kind"] == "metrics"]
    assert len(metrics) == 4 * 20_000
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    assert [m["kind"] for m in messages[:: len(messages) - 1]] == ["start", "end"]
    assert "problems" not in messages[-1]


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(threads=st.integers(2, 16), steps=st.integers(1, 300))
def test_any_number_of_racing_threads_give_one_run(
    lmtop_env: dict[str, str], threads: int, steps: int
) -> None:
    runs, messages = _race(threads, steps)
    assert len(runs) == 1 and len(messages) == threads * steps + 2


# -- 7. steps outside [0, 2**63) ---------------------------------------------------------------

any_step = st.one_of(
    st.none(),
    st.integers(),
    st.sampled_from([-1, 2**63 - 1, 2**63, 2**64, 2**70, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=5),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(any_step, min_size=1, max_size=6))
def test_any_step_loses_nothing_else(lmtop_env: dict[str, str], steps: list[Any]) -> None:
    from lmtop import hooks

    run = hooks.init()
    for step in steps:
        hooks.publish({"loss": 1.0}, step=step)
    hooks.publish({"loss": 2.0})  # a default step after whatever came before
    hooks.event("checkpoint saved")
    hooks.finish()
    assert run is not None
    raw = (Path(lmtop_env["LMTOP_DIR"]) / run / "rank-0.jsonl").read_bytes().splitlines()
    decoded = [schema.decode(line) for line in raw]  # every line is one the viewer accepts
    assert [m.kind for m in decoded] == ["start"] + ["metrics"] * (len(steps) + 1) + [
        "event",
        "end",
    ]
    assert all(m.step is None or 0 <= m.step < 2**63 for m in decoded)
    valid = [s for s in steps if type(s) is int and 0 <= s < 2**63]
    if valid and steps[-1] is valid[-1] and valid[-1] < 2**63 - 1:
        assert decoded[-3].step == valid[-1] + 1


@given(
    step=st.one_of(
        st.integers(min_value=-(2**63), max_value=-1),
        st.integers(min_value=2**63, max_value=2**64 - 1),
    )
)
def test_the_decoder_refuses_steps_and_seqs_outside_the_signed_64_bit_range(step: int) -> None:
    with pytest.raises(schema.BadMessage, match="step"):
        schema.decode(line("r", 0, 1, 0, "metrics", step, 1.0, m={}))
    with pytest.raises(schema.BadMessage, match="seq"):
        schema.decode(line("r", 0, 1, step, "metrics", 0, 1.0, m={}))
    assert (
        schema.decode(line("r", 0, 1, 2**63 - 1, "metrics", 2**63 - 1, 1.0, m={})).step == 2**63 - 1
    )


# -- issue 11, item 3: the run name is decided once per launch ---------------------------------

LAUNCHER = """
import os, subprocess, sys
world, first, total = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rank_code = "from lmtop import hooks\\nfor s in range(3): hooks.publish({'x': float(s)}, step=s)"
ranks = [
    subprocess.Popen(
        [sys.executable, "-c", rank_code],
        env=dict(os.environ, RANK=str(first + r), LOCAL_RANK=str(r), WORLD_SIZE=str(total)),
    )
    for r in range(world)
]
sys.exit(max(p.wait() for p in ranks))
"""


def _launch(world: int, first: int = 0, total: int = 0, **env: str) -> None:
    """One launch of ``world`` ranks (global ranks from ``first``, of ``total``), all children
    of one launcher process, as torchrun starts them on one node."""
    subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(world), str(first), str(total or world)],
        env=dict(os.environ, **env),
        check=True,
        timeout=120,
    )


def _runs_by_rank_files(folder: Path) -> dict[str, list[str]]:
    return {
        run.name: sorted(p.name for p in run.glob("rank-*.jsonl"))
        for run in folder.iterdir()
        if run.is_dir() and not run.name.startswith(".")
    }


def test_all_ranks_of_a_launch_agree_on_an_existing_name(lmtop_env: dict[str, str]) -> None:
    folder = Path(lmtop_env["LMTOP_DIR"])
    python("from lmtop import hooks; hooks.publish({'x': 1.0})", dict(os.environ, LMTOP_RUN="sft"))
    for _ in range(3):
        _launch(4, LMTOP_RUN="sft")
    runs = _runs_by_rank_files(folder)
    assert runs.pop("sft") == ["rank-0.jsonl"]  # yesterday's run is left alone
    assert len(runs) == 3, runs
    for name, files in runs.items():
        assert name.startswith("sft-") and files == [f"rank-{r}.jsonl" for r in range(4)]
        launches = {lines_of(folder / name / f)[0]["info"]["launch"] for f in files}
        assert len(launches) == 1 and (folder / name / ".launch").read_text() in launches


def test_a_new_name_is_taken_by_the_whole_launch(lmtop_env: dict[str, str]) -> None:
    _launch(3, LMTOP_RUN="fresh")
    assert _runs_by_rank_files(Path(lmtop_env["LMTOP_DIR"])) == {
        "fresh": ["rank-0.jsonl", "rank-1.jsonl", "rank-2.jsonl"]
    }


def test_a_rendezvous_id_names_the_launch_across_launcher_processes(
    lmtop_env: dict[str, str],
) -> None:
    python(
        "from lmtop import hooks; hooks.publish({'x': 1.0})", dict(os.environ, LMTOP_RUN="multi")
    )
    for node in range(2):  # two nodes on a shared filesystem: two launchers, one rendezvous id
        _launch(2, first=2 * node, total=4, LMTOP_RUN="multi", TORCHELASTIC_RUN_ID="abc123")
    runs = _runs_by_rank_files(Path(lmtop_env["LMTOP_DIR"]))
    assert runs.pop("multi") == ["rank-0.jsonl"]
    assert list(runs.values()) == [[f"rank-{r}.jsonl" for r in range(4)]]


# -- 12. lines nested too deep to re-encode ----------------------------------------------------


@given(depth=st.integers(1, 1024), where=st.sampled_from(["info", "data", "extra", "m"]))
def test_any_nesting_the_decoder_accepts_can_be_re_encoded(depth: int, where: str) -> None:
    nested = b"[" * depth + b"]" * depth
    if where == "m":  # a metric whose value is not a number: dropped from m, not the message
        nested = b'{"x":' + nested + b',"loss":1}'
    raw = line("r", 0, 1, 0, "start", None, 1.0).replace(
        b"}\n", b',"' + where.encode() + b'":' + nested + b"}\n"
    )
    try:
        message = schema.decode(raw)
    except schema.BadMessage:
        assert depth > schema.MAX_DEPTH  # refused, counted by the reader: never kept unencodable
        return
    assert schema.decode(message.encode()).data == message.data


def test_a_line_nested_1000_deep_does_not_stop_the_headless_viewer(tmp_path: Path) -> None:
    run = tmp_path / "deep"
    run.mkdir()
    deep = line("deep", 0, 1, 1, "event", 0, 2.0, text="x").replace(
        b"}\n", b',"data":' + b"[" * 1000 + b"]" * 1000 + b"}\n"
    )
    (run / "rank-0.jsonl").write_bytes(
        line("deep", 0, 1, 0, "start", None, 1.0, info={})
        + deep
        + line("deep", 0, 1, 2, "metrics", 1, 3.0, m={"loss": 1.5})
        + line("deep", 0, 1, 3, "end", 1, 4.0, status="ok")
    )
    watcher = viewer("--no-follow", str(run))
    stdout, stderr = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, stderr
    printed = [orjson.loads(raw) for raw in stdout.splitlines()]
    assert any(p.get("m") == {"loss": 1.5} for p in printed)


def test_a_deep_field_in_place_of_a_metrics_messages_step_is_refused() -> None:
    raw = line("r", 0, 1, 0, "metrics", 0, 1.0, m={}).replace(
        b'"step":0', b'"deep":' + b"[" * 300 + b"]" * 300
    )
    with pytest.raises(schema.BadMessage, match="nested deeper"):
        schema.decode(raw)


# -- 14. a rank file replaced by something that is not a file ----------------------------------


def _replace_with(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        import socket

        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "socket"])
def test_a_rank_file_replaced_by_a_fifo_or_device_is_counted_not_read(
    tmp_path: Path, kind: str
) -> None:
    import threading

    from lmtop.tui.runfile import RankFile

    run = tmp_path / "r"
    run.mkdir()
    path = run / "rank-0.jsonl"
    path.write_bytes(line("r", 0, 1, 0, "start", None, 1.0, info={}))
    reader = RankFile(path, 0)
    assert len(reader.read()[0]) == 1
    _replace_with(path, kind)
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(reader.read()), daemon=True)
    worker.start()
    worker.join(5)
    assert results == [([], False)], "the read blocked"
    reader.read()
    assert reader.bad_lines == 1 and reader.not_regular  # counted once, not per poll


# -- 11. the exit status reaches the end message -----------------------------------------------

EXITS = {
    "sys.exit(3)": ("error", "exit status 3", 3),
    "sys.exit('fatal: CUDA OOM')": ("error", "fatal: CUDA OOM (exit status 1)", 1),
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)": (
        "error",
        "exit status 143",
        143,
    ),
    "sys.exit(0)": ("ok", None, 0),
    "sys.exit()": ("ok", None, 0),
    "pass": ("ok", None, 0),
}


@pytest.mark.parametrize("ending", list(EXITS))
def test_the_exit_status_is_recorded_in_the_end_message(
    lmtop_env: dict[str, str], ending: str
) -> None:
    status, error, code = EXITS[ending]
    code_ = f"import os, signal, sys, time\nfrom lmtop import hooks\nhooks.init(run='ends')\nhooks.publish({{'x': 1.0}})\n{ending}\n"
    result = subprocess.run([sys.executable, "-c", code_], capture_output=True, timeout=60)
    assert result.returncode == code
    end = lines_of(Path(lmtop_env["LMTOP_DIR"]) / "ends" / "rank-0.jsonl")[-1]
    assert end["kind"] == "end" and end["status"] == status and end.get("error") == error


# -- 9. nothing after end -------------------------------------------------------------------------

RACE_FINISH = """
import sys, threading, time
from lmtop import hooks
for attempt in range(int(sys.argv[1])):
    hooks.init(run=f"race-{attempt}")
    publisher = hooks.current()
    stop = threading.Event()
    def loop():
        while not stop.is_set():
            publisher.publish({"x": 1.0})
    workers = [threading.Thread(target=loop) for _ in range(4)]
    for w in workers: w.start()
    time.sleep(0.01)
    publisher.finish()
    time.sleep(0.005)
    stop.set()
    for w in workers: w.join()
"""


def test_a_publish_racing_finish_never_writes_after_end(lmtop_env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-c", RACE_FINISH, "30"], check=True, timeout=120)
    after_end = 0
    for run in Path(lmtop_env["LMTOP_DIR"]).iterdir():
        kinds = [m["kind"] for m in lines_of(run / "rank-0.jsonl")]
        assert kinds.count("end") == 1
        after_end += len(kinds) - 1 - kinds.index("end")
    assert after_end == 0


# -- 8. a full disk, then space again ----------------------------------------------------------

FULL_THEN_FREE = """
import json, resource
from lmtop import hooks
hooks.init(run="disk")
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))  # the disk fills
for step in range(1000):
    hooks.publish({"loss": 1.0, "step_while": 0.0}, step=step)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
for step in range(1000, 1100):  # space again
    hooks.publish({"loss": 1.0, "step_while": 1.0}, step=step)
hooks.finish()
"""


def test_the_first_message_after_a_full_disk_is_not_lost(lmtop_env: dict[str, str]) -> None:
    python(FULL_THEN_FREE)
    raw = (Path(lmtop_env["LMTOP_DIR"]) / "disk" / "rank-0.jsonl").read_bytes().splitlines()
    good, bad = [], 0
    for one in raw:
        try:
            good.append(schema.decode(one))
        except schema.BadMessage:
            bad += 1
    assert bad == 1  # the one line the disk cut short
    after = [m.step for m in good if m.kind == "metrics" and m.m["step_while"] == 1.0]
    assert after == list(range(1000, 1100))
    assert good[-1].kind == "end"


# -- 10. spawned workers start no run of their own ---------------------------------------------

SPAWNED = """
import json, multiprocessing as mp, sys
from lmtop import hooks

def worker(explicit):
    if explicit:
        hooks.init(run="worker-own")
    for step in range(5):
        hooks.publish({"from_worker": 1.0}, step=step)
    print(json.dumps(hooks.stats()), flush=True)

if __name__ == "__main__":
    hooks.init(run="parent")
    hooks.publish({"loss": 1.0}, step=0)
    context = mp.get_context(sys.argv[1])
    for explicit in (False, False, True):
        child = context.Process(target=worker, args=(explicit,))
        child.start()
        child.join()
    hooks.publish({"loss": 0.5}, step=1)
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawned_workers_start_no_run_unless_they_call_init(
    lmtop_env: dict[str, str], tmp_path: Path, method: str
) -> None:
    script = tmp_path / "spawned.py"
    script.write_text(SPAWNED)
    result = subprocess.run(
        [sys.executable, str(script), method], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in Path(lmtop_env["LMTOP_DIR"]).iterdir()) == [
        "parent",
        "worker-own",
    ]
    assert result.stderr.count("multiprocessing child that did not call init") == 2  # once each
    stats = [json.loads(raw) for raw in result.stdout.splitlines()]
    assert [sum(s.values()) for s in stats] == [1, 1, 0]


# -- properties: the hook's inputs and the viewer's --------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=10),
    st.binary(max_size=10),
    st.just(object()),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
names = st.one_of(
    st.text(max_size=250),
    st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3),  # lone surrogates
    st.integers(),
    st.tuples(st.integers()),
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(st.dictionaries(names, values, max_size=12), min_size=1, max_size=4),
    step=any_step,
)
def test_any_names_and_values_give_one_decodable_message_per_publish(
    lmtop_env: dict[str, str], batches: list[dict[Any, Any]], step: Any
) -> None:
    from lmtop import hooks

    run = hooks.init()
    for metrics in batches:
        hooks.publish(metrics, step=step)
    hooks.finish()
    assert run is not None
    raw = (Path(lmtop_env["LMTOP_DIR"]) / run / "rank-0.jsonl").read_bytes().splitlines()
    decoded = [schema.decode(one) for one in raw]
    assert [m.kind for m in decoded].count("metrics") == len(batches)
    for message in decoded:
        assert all(type(v) in (int, float) for v in message.m.values())


json_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(
        ["1e400", "-1e400", "1" + "0" * 40, "-0", "NaN", '"NaN"', '"Infinity"', "[]", "{}"]
    ),
)


@given(
    step=json_numbers,
    seq=json_numbers,
    rank=json_numbers,
    value=json_numbers,
    junk=st.binary(max_size=40),
)
def test_the_decoder_keeps_only_what_it_can_store_and_re_encode(
    step: str, seq: str, rank: str, value: str, junk: bytes
) -> None:
    text = (
        f'{{"v":1,"run":"r","rank":{rank},"world":2,"seq":{seq},"t":1.5,"kind":"metrics",'
        f'"step":{step},"m":{{"loss":{value}}}}}'
    )
    for raw in (text.encode(), text.encode() + junk, junk):
        try:
            message = schema.decode(raw)
        except schema.BadMessage:
            continue
        assert message.step is None or 0 <= message.step < 2**63
        assert 0 <= message.seq < 2**63 and 0 <= message.rank < schema.MAX_RANK
        assert all(type(v) in (int, float) for v in message.m.values())
        assert schema.decode(message.encode()).data == message.data
