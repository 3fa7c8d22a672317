"""Several nodes over the relay: the aggregator's CPU per message and publish-to-viewer latency.

    python benchmarks/relay.py [--nodes 8] [--ranks-per-node 8] [--rate 10] [--metrics 20]
                               [--seconds 20] [--json out.json]

Simulated nodes share this machine, each with its own run folder and runtime directory (as
separate hosts have), one shared key, TCP on 127.0.0.1. Every rank is a process of its own with a
real ``Publisher`` built with the identity a launcher would give it, so local rank 0's relay and
global rank 0's aggregator start exactly as in a job; rank 0's process CPU is the aggregator's
plus one rank's publishing. Every rank publishes ``--metrics`` float metrics ``--rate`` times a
second for ``--seconds``.

A viewer on node 0 (``Follower``, this process) follows the run from node 0's registry, as
``lmtop`` would. Reported: the aggregator process's CPU (user + system, all its threads) per
relayed message, its peak RSS; end-to-end latency from ``publish`` (the message's ``t``) to the
viewer's ``poll`` returning it, p50/p99/max over every metrics message of every rank (remote
ranks and node 0's own separately; all of them, and those of each rank's steps after its first
3 s, once every link is up and the viewer has found every rank); messages lost (not in node 0's final
copy); the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MASTER = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((MASTER, 0))
        return int(s.getsockname()[1])


def _thread_cpu(tid: int | None) -> float | None:
    """A thread's user + system CPU seconds so far, from /proc (10 ms ticks)."""
    try:
        raw = Path(f"/proc/self/task/{tid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def node_main(args: argparse.Namespace) -> None:
    """One simulated node (or node 0's rank 0 alone): publish, finish, print a JSON line."""
    import resource

    from lmtop.hooks.identity import Identity, default_run_name, identity, safe_name
    from lmtop.hooks.publisher import Publisher

    ranks = [int(r) for r in args.node_ranks.split(",")]
    who = identity()  # the launch key from MASTER_ADDR:MASTER_PORT, as on any node
    name = safe_name(default_run_name(who))
    folder = Path(os.environ["LMTOP_DIR"])
    publishers = []
    for rank in ranks:
        local = rank % args.ranks_per_node
        me = Identity(rank, local, who.world, True, who.launch)
        publishers.append(Publisher(name, me, folder))
    names = [f"metric_{i}" for i in range(args.metrics)]
    cpu0 = time.process_time()
    period = 1.0 / args.rate
    start = time.monotonic() + period
    steps = int(args.seconds * args.rate)
    for step in range(steps):
        delay = start + step * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for publisher in publishers:
            publisher.publish({n: step + i / 10 for i, n in enumerate(names)}, step)
    time.sleep(args.linger)  # node 0's rank 0 stays a moment for the last lines of the others
    cpu = time.process_time() - cpu0
    relay = publishers[0]._relay
    written = getattr(relay, "written", None)
    thread = getattr(relay, "_thread", None)
    thread_cpu = _thread_cpu(thread.native_id) if thread is not None else None
    for publisher in reversed(publishers):  # the relay's rank last, as if they ended together
        publisher.finish()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = {"ranks": ranks, "cpu": cpu, "written": written, "rss_kib": rss}
    print(json.dumps(report | {"thread_cpu": thread_cpu}))
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--rate", type=float, default=10.0, help="steps per second per rank")
    parser.add_argument("--metrics", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--node-ranks", help=argparse.SUPPRESS)  # a node process's ranks
    parser.add_argument("--linger", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node_ranks:
        node_main(args)
        return

    from lmtop.tui.follow import Follower

    loadavg_before = Path("/proc/loadavg").read_text().split()[:3]
    base = Path(tempfile.mkdtemp(prefix="lrb", dir="/tmp"))
    world = args.nodes * args.ranks_per_node
    master_port, port = _free_port(), _free_port()
    common = {
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(args.ranks_per_node),
        "GROUP_WORLD_SIZE": str(args.nodes),
        "MASTER_ADDR": MASTER,
        "MASTER_PORT": str(master_port),
        "LMTOP_PORT": str(port),
        "XDG_CONFIG_HOME": str(base / "home"),  # one home: one key
        "LOCAL_RANK": "0",
        "RANK": "0",
    }
    nodes = []
    for node in range(args.nodes):
        runtime = base / f"rt{node}"
        runtime.mkdir(mode=0o700)
        env = dict(common, LMTOP_DIR=str(base / f"node{node}"), LMTOP_RUNTIME_DIR=str(runtime))
        nodes.append(dict(os.environ, **env, GROUP_RANK=str(node)))
    os.environ["LMTOP_RUNTIME_DIR"] = str(base / "rt0")  # this viewer is on node 0
    follower = Follower()
    r = args.ranks_per_node
    # One process per rank, as under a launcher; rank 0 (the aggregator) stays 3 s longer.
    groups = [([rank], rank // r, 3.0 if rank == 0 else 0.0) for rank in range(world)]
    procs = []
    common_args = [
        f"--ranks-per-node={r}",
        f"--rate={args.rate}",
        f"--metrics={args.metrics}",
        f"--seconds={args.seconds}",
    ]
    for ranks, node, linger in groups:
        command = [sys.executable, __file__, *common_args, f"--linger={linger}"]
        command.append(f"--node-ranks={','.join(map(str, ranks))}")
        procs.append(subprocess.Popen(command, env=nodes[node], stdout=subprocess.PIPE))
    latencies: dict[str, list[float]] = {"remote": [], "node 0": []}
    warm: dict[str, list[float]] = {"remote": [], "node 0": []}  # after each rank's first 3 s
    seen = [0] * world
    deadline = time.monotonic() + args.seconds + 120
    while time.monotonic() < deadline and not (follower.done and len(follower.runs)):
        for _, message in follower.poll(0.05):
            now = time.time()
            seen[message.rank] += 1
            if message.kind == "metrics":
                side = "node 0" if message.rank < r else "remote"
                latencies[side].append(now - message.t)
                if message.step is not None and message.step >= 3 * args.rate:
                    warm[side].append(now - message.t)
    follower.close()
    reports = [json.loads(p.communicate()[0].decode().strip().splitlines()[-1]) for p in procs]
    aggregator = reports[0]
    steps = int(args.seconds * args.rate)
    (run_dir,) = [p for p in (base / "node0").iterdir() if p.is_dir()]
    lost = 0
    for rank in range(world):
        try:
            lines = (run_dir / f"rank-{rank}.jsonl").read_bytes().count(b"\n")
        except OSError:
            lines = 0
        lost += steps + 2 - lines
    relayed = (args.nodes - 1) * r * (steps + 2)

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "nodes": args.nodes,
        "ranks": world,
        "rate": args.rate,
        "metrics": args.metrics,
        "seconds": args.seconds,
        "messages_relayed": relayed,
        "aggregator_written": aggregator["written"],
        "aggregator_cpu_s": round(aggregator["cpu"], 3),
        "aggregator_cpu_us_per_message": round(aggregator["cpu"] / max(1, relayed) * 1e6, 1),
        # Of which the aggregator's own Python thread (the rest: libzmq's I/O threads, where
        # CurveZMQ decrypts, the ZAP thread, and rank 0's own publishing).
        "aggregator_thread_us_per_message": round(
            (aggregator["thread_cpu"] or 0.0) / max(1, relayed) * 1e6, 1
        ),
        "aggregator_rss_mib": round(aggregator["rss_kib"] / 1024, 1),
        # For scale: the CPU of a rank that only publishes, and of one that also relays.
        "plain_rank_cpu_s": round(reports[1]["cpu"], 3) if len(reports) > 1 else None,
        "relay_rank_cpu_s": round(reports[r]["cpu"], 3) if len(reports) > r else None,
        "latency_ms": {
            f"{side}{label}": {
                "p50": round(pct(v, 0.5), 1),
                "p99": round(pct(v, 0.99), 1),
                "max": round(pct(v, 1.0), 1),
                "n": len(v),
            }
            for label, table in (("", latencies), (", after 3 s", warm))
            for side, v in table.items()
        },
        "viewer_saw_each_once": seen == [steps + 2] * world,
        "lost_in_node0_copy": lost,
        "loadavg_before": loadavg_before,
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not os.environ.get("LMTOP_BENCH_KEEP"):
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
