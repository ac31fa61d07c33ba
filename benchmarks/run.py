"""Benchmarks: throughput, latency and RPCs per operation, beside baselines.

Run with ``make bench`` (``make bench BENCH_ARGS="--cluster 3"`` for a
3-node cluster). Starts its own etcd through ``etcd_patterns.testing``,
runs every case for several rounds, counts RPCs from etcd's own
``grpc_server_started_total``, and writes ``benchmarks/results/latest.json``,
``docs/benchmarks.md`` and PNG plots under ``docs/img/``.

Absolute rates drift on a shared machine; each is reported beside the raw
etcd3 guarded-put rate measured in the same run, and RPC counts, which do not
drift, beside every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import itertools
import json
import multiprocessing
import os
import platform
import pstats
import secrets
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import etcd3

from etcd_patterns import EtcdPatterns, QueueEmptyError
from etcd_patterns import _ops as ops
from etcd_patterns._queue import CHAIN
from etcd_patterns.testing import EtcdCluster, RpcCount, find_etcd_binary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "latest.json"
REPORT = ROOT / "docs" / "benchmarks.md"
IMAGES = ROOT / "docs" / "img"
BACKGROUND = RpcCount.BACKGROUND
PEER_LOCK_TTL = 10  # seconds: python-etcd3's Lock leases


@dataclass
class Result:
    """One case: rates per round, latencies, and RPCs per operation."""

    family: str
    name: str
    ops_per_s: list[float]
    latencies_ms: list[float] = field(default_factory=list)
    rpcs_per_op: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return statistics.median(self.ops_per_s) if self.ops_per_s else None

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rpcs(counter: RpcCount) -> int:
    return sum(n for key, n in counter.counts.items() if key not in BACKGROUND)


class Bench:
    """Runs cases against one cluster and collects their results."""

    def __init__(self, cluster: EtcdCluster, rounds: int, scale: float) -> None:
        self.cluster = cluster
        self.rounds = rounds
        self.scale = scale
        self.results: list[Result] = []
        self.baseline: Callable[[int], object] | None = None
        self.profiles: dict[str, dict[str, Any]] = {}

    def n(self, base: int) -> int:
        return max(10, int(base * self.scale))

    def connect(self, namespace: str | None = None, **options: Any) -> EtcdPatterns:
        namespace = namespace or f"/bench/{uuid.uuid4().hex[:8]}/"
        return EtcdPatterns.connect(self.cluster.endpoints, namespace=namespace, **options)

    def timed(
        self, family: str, name: str, op: Callable[[int], object], ops: int, **extra: Any
    ) -> Result:
        """Run ``op(i)`` ``ops`` times per round, timing each call.

        Each round is preceded by as many baseline operations, so that the
        ratio to the baseline compares rates measured moments apart.
        """
        op(-1)  # warm up: sessions, channels, caches
        rates: list[float] = []
        ratios: list[float] = []
        latencies: list[float] = []
        calls = 0
        for _ in range(self.rounds):
            if self.baseline is not None:
                started = time.perf_counter()
                for i in range(ops):
                    self.baseline(i)
                base = ops / (time.perf_counter() - started)
            with self.cluster.count_rpcs() as counter:
                started = time.perf_counter()
                for i in range(ops):
                    begin = time.perf_counter()
                    op(i)
                    latencies.append((time.perf_counter() - begin) * 1000)
                rates.append(ops / (time.perf_counter() - started))
            calls += rpcs(counter)
            if self.baseline is not None:
                ratios.append(rates[-1] / base)
        if ratios:
            extra["ratio"] = statistics.median(ratios)
            extra["ratios"] = ratios
        result = Result(family, name, rates, latencies, calls / (ops * self.rounds), extra)
        self.add(result)
        return result

    def add(self, result: Result) -> None:
        self.results.append(result)
        p50 = result.percentile(0.5)
        rpc = "" if result.rpcs_per_op is None else f" {result.rpcs_per_op:.2f} RPC/op"
        lat = "" if p50 is None else f" p50 {p50:.2f} ms"
        rate = "latency only" if result.median is None else f"{result.median:9.0f}/s"
        print(f"  {result.family:9} {result.name:44} {rate}{rpc}{lat}", flush=True)


# -- where the time goes ----------------------------------------------------------

PROFILE_TOP = 8


def profiles(bench: Bench) -> None:
    """cProfile's top entries, by own time, for the calls the targets are about."""
    with bench.connect() as etcd:

        def lock_cycle(_: int) -> None:
            with etcd.locked("profiled-lock"):
                pass

        cases: dict[str, Callable[[int], object]] = {
            "enqueue": lambda _: etcd.enqueue("profiled-queue", "v"),
            "lock cycle, uncontended": lock_cycle,
            "transform, uncontended": lambda _: etcd.transform("profiled", _incr, default="0"),
        }
        for name, op in cases.items():
            op(-1)
            count = bench.n(1000)
            profiler = cProfile.Profile()
            started = time.perf_counter()
            profiler.enable()
            for i in range(count):
                op(i)
            profiler.disable()
            wall = time.perf_counter() - started
            table = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
            top = sorted(table.items(), key=lambda entry: entry[1][2], reverse=True)
            bench.profiles[name] = {
                "calls": count,
                "wall us per call (profiled)": wall / count * 1e6,
                "top": [
                    {
                        "function": f"{Path(path).name}:{line}({function})",
                        "calls per call": primitive / count,
                        "own us per call": own / count * 1e6,
                        "cumulative us per call": cumulative / count * 1e6,
                    }
                    for (path, line, function), (primitive, _, own, cumulative, _) in top[
                        :PROFILE_TOP
                    ]
                ],
            }
            print(f"  profiled {name}: {wall / count * 1e6:.0f} us per call", flush=True)


def _incr(value: str) -> str:
    return str(int(value) + 1)


# -- baselines --------------------------------------------------------------------


def raw_client(endpoint: str) -> Any:
    host, port = endpoint.rsplit(":", 1)
    return etcd3.client(host=host, port=int(port), timeout=10)


def baselines(bench: Bench) -> None:
    client = raw_client(bench.cluster.endpoints[0])
    client.put("/bench-raw/k", "v")
    bench.timed("baseline", "raw etcd3 get", lambda _: client.get("/bench-raw/k"), bench.n(500))
    key = "/bench-raw/guarded"

    def guarded_put(i: int) -> None:
        client.transaction(
            compare=[client.transactions.version(key) > -1],
            success=[client.transactions.put(key, str(i))],
            failure=[],
        )

    bench.timed("baseline", "raw etcd3 guarded txn put", guarded_put, bench.n(500))
    bench.baseline = guarded_put  # interleaved with every later single-process case
    # An enqueue's own transaction, sent by the raw client: what the
    # transaction costs etcd, apart from the library's Python work; and the
    # same without the exactly-once commit's bookkeeping key.
    for bookkeeping in (True, False):
        name = "raw etcd3 txn shaped as an enqueue" + (
            ", with the bookkeeping key" if bookkeeping else ", without the bookkeeping key"
        )
        bench.timed("baseline", name, _enqueue_shaped(client, bookkeeping), bench.n(500))
    # A lock cycle's two transactions, sent by the raw client as the
    # library sends them (the slot compared, not written), and with the slot
    # written as well, as a write without a key of its own does.
    for written in (False, True):
        name = "raw etcd3 txns shaped as a lock cycle" + (
            ", with the bookkeeping key written" if written else ""
        )
        bench.timed("baseline", name, _lock_shaped(client, written), bench.n(300))


def _enqueue_shaped(client: Any, bookkeeping: bool) -> Callable[[int], object]:
    """A raw transaction shaped as `enqueue`'s: the queue's compare, the item's, the slot's."""
    queue = b"/bench-raw/q"
    slot = b"/bench-raw/.etcd-patterns/slots/0123456789abcdef/1"
    lease = client.lease(600).id

    def send(i: int) -> None:
        item = queue + b"/1000-%020d-%s" % (time.time_ns(), secrets.token_hex(4).encode())
        compare = [ops.compare_version(queue, "==", 0), ops.compare_version(item, "==", 0)]
        success = [ops.put(item, b"v")]
        failure = [ops.get(queue, keys_only=True)]
        if bookkeeping:
            compare.append(ops.compare_version(slot + b"/unused", "==", 0))
            success.append(ops.put(slot, secrets.token_hex(8).encode(), lease=lease))
            failure.append(ops.get(slot))
        client.kvstub.Txn(ops.txn(compare=compare, success=success, failure=failure), 10)

    return send


def _lock_shaped(client: Any, written: bool) -> Callable[[int], object]:
    """A lock cycle's transactions, sent raw: the registration, then the release."""
    name = b"/bench-raw/L"
    start, end = name + b"/", name + b"0"
    slot = b"/bench-raw/.etcd-patterns/slots/%s/1" % secrets.token_hex(8).encode()
    lease = client.lease(600).id
    token = [b""]

    def send(i: int) -> None:
        mine = start + b"0123456789abcdef-%d" % i
        slot_holds = (
            ops.compare_value(slot, "==", token[0])
            if token[0]
            else ops.compare_version(slot, "==", 0)
        )
        success = [
            ops.get(start, end, newest_first=True, limit=1, keys_only=True),
            ops.put(mine, b"host:pid:thread", lease=lease),
        ]
        fresh = secrets.token_hex(8).encode()
        if written:
            success.append(ops.put(slot, fresh, lease=lease))
        registered = client.kvstub.Txn(
            ops.txn(
                compare=[ops.compare_version(name, "==", 0), slot_holds],
                success=success,
                failure=[ops.get(name, keys_only=True), ops.get(slot)],
            ),
            10,
        )
        assert registered.succeeded
        if written:
            token[0] = fresh
        client.kvstub.Txn(ops.delete_if_created(mine, registered.header.revision), 10)

    return send


# -- key-value --------------------------------------------------------------------


def _increment_worker(
    endpoints: list[str], namespace: str, count: int, start: Any, done: Any
) -> None:
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
        etcd.get_values("counter")
        start.wait(timeout=60)
        for _ in range(count):
            etcd.transform("counter", lambda v: str(int(v) + 1), default="0")
        done.wait(timeout=600)


@dataclass
class Window:
    """A steady-state measurement: from every worker's start to every worker's end.

    Workers connect and warm up before ``start``, and close after ``done``,
    so that neither their lease grants and first reads nor their lease
    revokes and shutdown fall inside the window.
    """

    seconds: float
    rpcs: int
    counts: Counter[str]


Worker = tuple[Callable[..., None], tuple[Any, ...]]


def run_processes(bench: Bench, workers: Sequence[Worker]) -> Window:
    """Run one process per ``(target, args)``, as ``target(*args, start, done)``; the window."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(len(workers) + 1)
    done = context.Barrier(len(workers) + 1)
    processes = [
        context.Process(target=target, args=(*args, start, done)) for target, args in workers
    ]
    for process in processes:
        process.start()
    start.wait(timeout=120)
    with bench.cluster.count_rpcs() as counter:
        began = time.perf_counter()
        done.wait(timeout=600)
        elapsed = time.perf_counter() - began
    for process in processes:
        process.join(timeout=600)
    if any(process.exitcode for process in processes):
        raise RuntimeError(f"a worker of {workers[0][0].__name__} failed")
    return Window(elapsed, rpcs(counter), counter.requests)


def key_value(bench: Bench) -> None:
    etcd = bench.connect()
    etcd.transform("k", lambda _: "v", default="")
    for i in range(100):
        etcd.transform(f"dir/{i:03}", lambda _: "v", default="")
    bench.timed("kv", "get_values (a key)", lambda _: etcd.get_values("k"), bench.n(500))
    bench.timed(
        "kv", "get_values (100-child directory)", lambda _: etcd.get_values("dir"), bench.n(300)
    )
    incr: Callable[[str], str] = lambda v: str(int(v) + 1)  # noqa: E731
    etcd.transform("n", lambda _: "0", default="")
    bench.timed("kv", "try_transform", lambda _: etcd.try_transform("n", incr), bench.n(300))
    bench.timed("kv", "transform, uncontended", lambda _: etcd.transform("n", incr), bench.n(300))
    # Another writer gets in between each call's read and its write, once:
    # the call pays for the losing write, whose answer carries the new value.
    meddler = raw_client(bench.cluster.endpoints[0])
    contested = etcd.namespace + "c"
    etcd.transform("c", lambda _: "0", default="")

    def conflicted(_: int) -> None:
        meddled: list[bool] = []

        def fn(value: str) -> str:
            if not meddled:
                meddled.append(True)
                meddler.put(contested, str(int(value) + 100))
            return incr(value)

        etcd.transform("c", fn)

    bench.timed(
        "kv",
        "transform, one conflict per call",
        conflicted,
        bench.n(200),
        **{"meddling puts per call": 1},
    )
    meddler.close()
    for contenders in (2, 4, 8):
        per = bench.n(100)
        namespace = f"/bench/{uuid.uuid4().hex[:8]}/"
        windows = [
            run_processes(
                bench, [(_increment_worker, (bench.cluster.endpoints, namespace, per))] * contenders
            )
            for _ in range(bench.rounds)
        ]
        total = contenders * per * bench.rounds
        bench.add(
            Result(
                "kv",
                f"transform, {contenders} processes (increments/s)",
                [contenders * per / window.seconds for window in windows],
                rpcs_per_op=sum(window.rpcs for window in windows) / total,
                extra={"contenders": contenders},
            )
        )
    etcd.close()


# -- locks ------------------------------------------------------------------------


def _lock_worker(
    endpoints: list[str],
    namespace: str,
    seconds: float,
    out: str,
    peer: bool,
    start: Any,
    done: Any,
) -> None:
    spans: list[tuple[float, float]] = []
    watches = 0
    if peer:
        client = raw_client(endpoints[0])
        client.get(namespace + "warm-up")
        # python-etcd3 multiplexes every watch of a client over one stream,
        # which etcd counts once: count the watches it creates instead.
        create = client.watch

        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal watches
            watches += 1
            return create(*args, **kwargs)

        client.watch = counted
        start.wait(timeout=120)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            lock = client.lock(namespace + "L", ttl=PEER_LOCK_TTL)
            # acquire() gives up after its own timeout and returns False:
            # only a real acquisition counts.
            if lock.acquire():
                began = time.monotonic()
                spans.append((began, time.monotonic()))
                lock.release()
        done.wait(timeout=600)
        client.close()
    else:
        with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
            etcd.lock("warm-up", lambda: None)
            start.wait(timeout=120)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                with etcd.locked("L"):
                    began = time.monotonic()
                    spans.append((began, time.monotonic()))
            done.wait(timeout=600)
    Path(out).write_text(json.dumps({"spans": spans, "watches": watches}))


def contended_locks(bench: Bench, workers: int, *, peer: bool, tmp: Path) -> Result:
    seconds = 4.0 * bench.scale
    namespace = f"/bench/{uuid.uuid4().hex[:8]}/"
    outs = [str(tmp / f"{'peer' if peer else 'ours'}-{workers}-{i}.json") for i in range(workers)]
    window = run_processes(
        bench,
        [(_lock_worker, (bench.cluster.endpoints, namespace, seconds, out, peer)) for out in outs],
    )
    outputs = [json.loads(Path(out).read_text()) for out in outs]
    per_worker = [output["spans"] for output in outputs]
    spans = sorted(span for spans in per_worker for span in spans)
    handoffs = [(b[0] - a[1]) * 1000 for a, b in itertools.pairwise(spans)]
    counts = [len(spans) for spans in per_worker]
    requests = window.rpcs
    if peer:
        # Its watch creations in place of its few multiplexed streams; ours
        # open a stream per watch, which etcd counts.
        requests += sum(output["watches"] for output in outputs)
        requests -= window.counts["etcdserverpb.Watch/Watch"]
    who = "python-etcd3 Lock" if peer else "lock"
    result = Result(
        "peers" if peer else "locks",
        f"{who}, {workers} processes (handoffs/s)",
        [len(spans) / seconds],
        handoffs,
        requests / max(1, len(spans)),
        {"contenders": workers, "acquisitions per worker": counts, "peer": peer},
    )
    bench.add(result)
    return result


def locks(bench: Bench, tmp: Path) -> None:
    etcd = bench.connect()
    other = bench.connect(etcd.namespace)  # holds the lock that etcd tries
    bench.timed(
        "locks", "lock cycle, uncontended", lambda _: etcd.lock("L", lambda: None), bench.n(300)
    )
    with other.locked("held"):
        bench.timed(
            "locks",
            "try_lock on a held lock",
            lambda _: etcd.try_lock("held", lambda: None),
            bench.n(300),
        )
    client = raw_client(bench.cluster.endpoints[0])

    def peer_cycle(_: int) -> None:
        lock = client.lock("/bench-peer/L", ttl=PEER_LOCK_TTL)
        lock.acquire()
        lock.release()

    bench.timed("peers", "python-etcd3 Lock cycle, uncontended", peer_cycle, bench.n(300))
    client.close()
    for workers in (2, 4, 8):
        contended_locks(bench, workers, peer=False, tmp=tmp)
    for workers in (4, 8):
        contended_locks(bench, workers, peer=True, tmp=tmp)
    etcd.close()
    other.close()
    # python-etcd3's Lock leaves a lease behind per acquisition: let those
    # expire now, rather than during the cases that follow.
    time.sleep(PEER_LOCK_TTL + 2)  # the peers' lease TTL, and etcd's expiry sweep


# -- queue ------------------------------------------------------------------------

SINGLE_HEAD = "4 producers x 4 consumers, one head per take (items/s)"


def _producer(endpoints: list[str], namespace: str, count: int, start: Any, done: Any) -> None:
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
        etcd.enqueue("warm-up", "x")
        start.wait(timeout=120)
        for i in range(count):
            etcd.enqueue("q", str(i))
        done.wait(timeout=600)


def _consumer(
    endpoints: list[str], namespace: str, count: int, chain: int, start: Any, done: Any
) -> None:
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
        etcd._queue._chain = chain  # how many heads one take tries
        etcd.enqueue("warm-up", "x")
        start.wait(timeout=120)
        for _ in range(count):
            etcd.dequeue("q", timeout=60)
        done.wait(timeout=600)


def _drainer(endpoints: list[str], namespace: str, start: Any, done: Any) -> None:
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
        etcd.enqueue("warm-up", "x")
        start.wait(timeout=120)
        with contextlib.suppress(QueueEmptyError):
            while True:
                etcd.dequeue("q", timeout=0)
        done.wait(timeout=600)


def queue(bench: Bench) -> None:
    etcd = bench.connect()
    bench.timed("queue", "enqueue", lambda i: etcd.enqueue("q", str(i)), bench.n(300))
    bench.timed(
        "queue", "enqueue, ttl=60", lambda i: etcd.enqueue("t", str(i), ttl=60), bench.n(200)
    )
    # Each of those items has a lease of its own: revoke them now rather
    # than have etcd expire them all during the cases that follow.
    client = raw_client(bench.cluster.endpoints[0])
    for lease in {meta.lease_id for _, meta in client.get_prefix(etcd.namespace + "t/")}:
        if lease:
            client.revoke_lease(lease)
    client.close()
    total = bench.n(300) * bench.rounds + 1
    etcd.enqueue_many("d", [str(i) for i in range(total + 1)])
    bench.timed(
        "queue", "dequeue, prefetch 16", lambda _: etcd.dequeue("d", timeout=0), bench.n(300)
    )
    single = bench.connect(prefetch=1)
    single.enqueue_many("d", [str(i) for i in range(total + 1)])
    bench.timed(
        "queue", "dequeue, prefetch 1", lambda _: single.dequeue("d", timeout=0), bench.n(300)
    )
    batch = [str(i) for i in range(100)]
    many = bench.timed(
        "queue", "enqueue_many, 100 per call", lambda _: etcd.enqueue_many("m", batch), bench.n(20)
    )
    many.extra["items_per_s"] = statistics.median(many.ops_per_s) * 100
    taken = bench.timed(
        "queue",
        "dequeue_many, 100 per call",
        lambda _: etcd.dequeue_many("m", 100, timeout=0),
        bench.n(20),
    )
    taken.extra["items_per_s"] = statistics.median(taken.ops_per_s) * 100

    def claim_cycle(_: int) -> None:
        with etcd.claim("c", timeout=0):
            pass

    etcd.enqueue_many("c", [str(i) for i in range(bench.n(200) * bench.rounds + 1)])
    bench.timed("queue", "claim and ack", claim_cycle, bench.n(200))

    # 4 producers x 4 consumers, end to end: consumers whose take tries the
    # first few heads in one round trip, and, in the same run, consumers
    # whose take tries the first head alone.
    for chain, name in ((CHAIN, "4 producers x 4 consumers (items/s)"), (1, SINGLE_HEAD)):
        rates, per_item = [], []
        for _ in range(bench.rounds):
            namespace, per = f"/bench/{uuid.uuid4().hex[:8]}/", bench.n(150)
            args = (bench.cluster.endpoints, namespace, per)
            window = run_processes(
                bench, [(_producer, args)] * 4 + [(_consumer, (*args, chain))] * 4
            )
            rates.append(4 * per / window.seconds)
            per_item.append(window.rpcs / (4 * per))
        bench.add(Result("queue", name, rates, [], statistics.mean(per_item)))

    # 8 consumers draining a backlog.
    namespace, backlog = f"/bench/{uuid.uuid4().hex[:8]}/", bench.n(5000)
    filler = bench.connect(namespace)
    for start in range(0, backlog, 60):
        filler.enqueue_many("q", [str(i) for i in range(start, min(start + 60, backlog))])
    filler.close()
    window = run_processes(bench, [(_drainer, (bench.cluster.endpoints, namespace))] * 8)
    bench.add(
        Result(
            "queue",
            "8 consumers draining a backlog (items/s)",
            [backlog / window.seconds],
            [],
            window.rpcs / backlog,
        )
    )

    # Wake-up latency of a blocked dequeue.
    waiter = bench.connect(etcd.namespace)  # waits on the queue that etcd fills
    latencies = []

    def receive(into: list[float]) -> None:
        waiter.dequeue("w", timeout=30)
        into.append(time.perf_counter())

    for i in range(bench.n(100)):
        got: list[float] = []
        thread = threading.Thread(target=receive, args=(got,))
        thread.start()
        while not _waiting(thread):
            time.sleep(0.001)
        sent = time.perf_counter()
        etcd.enqueue("w", str(i))
        thread.join()
        latencies.append((got[0] - sent) * 1000)
    # A latency, not a rate: one wake-up at a time, each after the waiter
    # was seen blocked on its watch.
    bench.add(Result("queue", "blocked dequeue wake-up", [], latencies, extra={"latency only": 1}))
    for instance in (etcd, single, waiter):
        instance.close()


def _waiting(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == "_watch_once":
            return True
        frame = frame.f_back
    return False


# -- peers in their own environment --------------------------------------------------


TOOZ_SCRIPT = """
import json, sys, time
from tooz import coordination
coordinator = coordination.get_coordinator(sys.argv[1], b"bench")
coordinator.start()
lock = coordinator.get_lock(b"bench-tooz")
n = int(sys.argv[2])
lat = []
started = time.perf_counter()
for _ in range(n):
    t = time.perf_counter()
    lock.acquire()
    lock.release()
    lat.append((time.perf_counter() - t) * 1000)
print(json.dumps({"rate": n / (time.perf_counter() - started), "lat": lat}))
coordinator.stop()
"""


def tooz(bench: Bench) -> None:
    venv = ROOT / "benchmarks" / ".peers-venv"
    python = venv / "bin" / "python"
    reason = None
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "tooz", "etcd3gw"],
            check=True,
            timeout=600,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as exc:
        reason = f"pip could not install tooz and etcd3gw: {exc.stderr.strip().splitlines()[-1:]}"
    except subprocess.TimeoutExpired:
        reason = "installing tooz and etcd3gw took longer than 10 minutes"
    if reason is None:
        url = f"etcd3+http://{bench.cluster.endpoints[0]}"
        run = subprocess.run(
            [str(python), "-c", TOOZ_SCRIPT, url, str(bench.n(200))],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if run.returncode == 0:
            data = json.loads(run.stdout.strip().splitlines()[-1])
            bench.add(
                Result("peers", "tooz etcd3gw lock cycle, uncontended", [data["rate"]], data["lat"])
            )
            return
        reason = f"tooz's lock failed: {run.stderr.strip().splitlines()[-1:]}"
    print(f"  peers     tooz: not measured: {reason}", flush=True)
    bench.results.append(
        Result("peers", "tooz etcd3gw lock cycle", [], extra={"not measured": reason})
    )


# -- report -----------------------------------------------------------------------


def describe_machine(cluster: EtcdCluster) -> dict[str, str]:
    version = subprocess.run(
        [find_etcd_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
        "etcd": f"{version} ({len(cluster.nodes)} member{'s' if len(cluster.nodes) > 1 else ''}, loopback)",
    }


@contextmanager
def temporary_dir() -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cluster", type=int, default=1, help="etcd members (default 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="operations per round, relative")
    parser.add_argument("--skip-tooz", action="store_true")
    args = parser.parse_args()
    with EtcdCluster(size=args.cluster) as cluster, temporary_dir() as tmp:
        bench = Bench(cluster, args.rounds, args.scale)
        machine = describe_machine(cluster)
        print(f"etcd: {machine['etcd']}; {args.rounds} rounds per case", flush=True)
        baselines(bench)
        key_value(bench)
        locks(bench, tmp)
        queue(bench)
        profiles(bench)
        if not args.skip_tooz:
            tooz(bench)
    from benchmarks.report import write_report

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": machine,
        "rounds": args.rounds,
        "settings": {
            "cluster members": args.cluster,
            "rounds per single-process case": args.rounds,
            "scale": args.scale,
            "seconds per contended lock case": 4.0 * args.scale,
            "tooz": not args.skip_tooz,
        },
        "results": [asdict(r) for r in bench.results],
        "profiles": bench.profiles,
    }
    RESULTS.write_text(json.dumps(data, indent=1))
    write_report(data, REPORT, IMAGES)
    print(f"wrote {RESULTS.relative_to(ROOT)} and {REPORT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
