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
import itertools
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import etcd3

from etcd_patterns import EtcdPatterns
from etcd_patterns.testing import EtcdCluster, RpcCount, find_etcd_binary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "latest.json"
REPORT = ROOT / "docs" / "benchmarks.md"
IMAGES = ROOT / "docs" / "img"
BACKGROUND = RpcCount.BACKGROUND


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
    def median(self) -> float:
        return statistics.median(self.ops_per_s)

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
        result = Result(family, name, rates, latencies, calls / (ops * self.rounds), extra)
        self.add(result)
        return result

    def add(self, result: Result) -> None:
        self.results.append(result)
        p50 = result.percentile(0.5)
        rpc = "" if result.rpcs_per_op is None else f" {result.rpcs_per_op:.2f} RPC/op"
        lat = "" if p50 is None else f" p50 {p50:.2f} ms"
        print(f"  {result.family:9} {result.name:44} {result.median:9.0f}/s{rpc}{lat}", flush=True)


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


# -- key-value --------------------------------------------------------------------


def _increment_worker(endpoints: list[str], namespace: str, count: int, start: Any) -> None:
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
        etcd.get_values("counter")
        start.wait(timeout=60)
        for _ in range(count):
            etcd.transform("counter", lambda v: str(int(v) + 1), default="0")


def run_processes(target: Callable[..., None], args: tuple[Any, ...], count: int) -> float:
    """Start ``count`` processes of ``target(*args, start)``; seconds from release to done."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(count + 1)
    processes = [context.Process(target=target, args=(*args, start)) for _ in range(count)]
    for process in processes:
        process.start()
    start.wait(timeout=120)
    began = time.perf_counter()
    for process in processes:
        process.join(timeout=600)
    elapsed = time.perf_counter() - began
    if any(process.exitcode for process in processes):
        raise RuntimeError(f"a worker of {target.__name__} failed")
    return elapsed


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
        rates = []
        with bench.cluster.count_rpcs() as counter:
            for _ in range(bench.rounds):
                elapsed = run_processes(
                    _increment_worker, (bench.cluster.endpoints, namespace, per), contenders
                )
                rates.append(contenders * per / elapsed)
        total = contenders * per * bench.rounds
        bench.add(
            Result(
                "kv",
                f"transform, {contenders} processes (increments/s)",
                rates,
                rpcs_per_op=rpcs(counter) / total,
                extra={"contenders": contenders},
            )
        )
    etcd.close()


# -- locks ------------------------------------------------------------------------


def _lock_worker(
    endpoints: list[str], namespace: str, seconds: float, out: str, peer: bool, start: Any
) -> None:
    spans: list[tuple[float, float]] = []
    if peer:
        client = raw_client(endpoints[0])
        start.wait(timeout=120)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            lock = client.lock(namespace + "L", ttl=10)
            lock.acquire()
            began = time.monotonic()
            spans.append((began, time.monotonic()))
            lock.release()
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
    Path(out).write_text(json.dumps(spans))


def contended_locks(bench: Bench, workers: int, *, peer: bool, tmp: Path) -> Result:
    seconds = 4.0 * bench.scale
    namespace = f"/bench/{uuid.uuid4().hex[:8]}/"
    outs = [str(tmp / f"{'peer' if peer else 'ours'}-{workers}-{i}.json") for i in range(workers)]
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(workers + 1)
    processes = [
        context.Process(
            target=_lock_worker,
            args=(bench.cluster.endpoints, namespace, seconds, out, peer, start),
        )
        for out in outs
    ]
    for process in processes:
        process.start()
    with bench.cluster.count_rpcs() as counter:
        start.wait(timeout=120)
        for process in processes:
            process.join(timeout=600)
    per_worker = [json.loads(Path(out).read_text()) for out in outs]
    spans = sorted(span for spans in per_worker for span in spans)
    handoffs = [(b[0] - a[1]) * 1000 for a, b in itertools.pairwise(spans)]
    counts = [len(spans) for spans in per_worker]
    who = "python-etcd3 Lock" if peer else "lock"
    result = Result(
        "peers" if peer else "locks",
        f"{who}, {workers} processes (handoffs/s)",
        [len(spans) / seconds],
        handoffs,
        rpcs(counter) / max(1, len(spans)),
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
        lock = client.lock("/bench-peer/L", ttl=10)
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


# -- queue ------------------------------------------------------------------------


def _producer(endpoints: list[str], namespace: str, count: int, start: Any) -> None:
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
        etcd.enqueue("warm-up", "x")
        start.wait(timeout=120)
        for i in range(count):
            etcd.enqueue("q", str(i))


def _consumer(endpoints: list[str], namespace: str, count: int, start: Any) -> None:
    with EtcdPatterns.connect(endpoints, namespace=namespace) as etcd:
        etcd.enqueue("warm-up", "x")
        start.wait(timeout=120)
        for _ in range(count):
            etcd.dequeue("q", timeout=60)


def queue(bench: Bench) -> None:
    etcd = bench.connect()
    bench.timed("queue", "enqueue", lambda i: etcd.enqueue("q", str(i)), bench.n(300))
    bench.timed(
        "queue", "enqueue, ttl=60", lambda i: etcd.enqueue("t", str(i), ttl=60), bench.n(200)
    )
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
    many.extra["items_per_s"] = many.median * 100
    taken = bench.timed(
        "queue",
        "dequeue_many, 100 per call",
        lambda _: etcd.dequeue_many("m", 100, timeout=0),
        bench.n(20),
    )
    taken.extra["items_per_s"] = taken.median * 100

    def claim_cycle(_: int) -> None:
        with etcd.claim("c", timeout=0):
            pass

    etcd.enqueue_many("c", [str(i) for i in range(bench.n(200) * bench.rounds + 1)])
    bench.timed("queue", "claim and ack", claim_cycle, bench.n(200))

    # 4 producers x 4 consumers, end to end.
    namespace, per = f"/bench/{uuid.uuid4().hex[:8]}/", bench.n(150)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(9)
    processes = [
        context.Process(target=target, args=(bench.cluster.endpoints, namespace, per, start))
        for target in [_producer] * 4 + [_consumer] * 4
    ]
    for process in processes:
        process.start()
    with bench.cluster.count_rpcs() as counter:
        start.wait(timeout=120)
        began = time.perf_counter()
        for process in processes:
            process.join(timeout=600)
        elapsed = time.perf_counter() - began
    bench.add(
        Result(
            "queue",
            "4 producers x 4 consumers (items/s)",
            [4 * per / elapsed],
            [],
            rpcs(counter) / (4 * per),
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
    bench.add(
        Result("queue", "blocked dequeue wake-up", [1000 / statistics.median(latencies)], latencies)
    )
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
    parser.add_argument("--rounds", type=int, default=3)
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
        if not args.skip_tooz:
            tooz(bench)
    from benchmarks.report import write_report

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": machine,
        "rounds": args.rounds,
        "results": [asdict(r) for r in bench.results],
    }
    RESULTS.write_text(json.dumps(data, indent=1))
    write_report(data, REPORT, IMAGES)
    print(f"wrote {RESULTS.relative_to(ROOT)} and {REPORT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
