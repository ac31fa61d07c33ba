"""Turns benchmarks/results/latest.json into docs/benchmarks.md and plots."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FAMILIES = {
    "baseline": "Baselines: the raw etcd3 client",
    "kv": "Key-value",
    "locks": "Locks",
    "queue": "Queue",
    "peers": "Peer libraries, same etcd, same run",
}


def median(rates: list[float]) -> float | None:
    return statistics.median(rates) if rates else None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def find(results: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(r for r in results if r["name"] == name)


def fmt(value: float | None, pattern: str = "{:.0f}") -> str:
    return "n/a" if value is None else pattern.format(value)


# Each sentence states something the table shows or the code does; what is
# not measured is said to be so.
WHY_MISSED = {
    "uncontended lock cycle >= 0.45x raw txn": (
        "a cycle is two round trips (the RPCs/op column), so 0.5x at best; the rest is the "
        "library's own work per call, which the section below breaks down. {lock_split}"
    ),
    "uncontended lock cycle >= 1.4x python-etcd3 Lock": (
        "a cycle is two transactions (the RPCs/op column); two of this run's raw guarded "
        "puts, with no Python work at all, would reach {peer_limit} of python-etcd3's "
        "cycle. The library's own work per call (see below) takes the rest."
    ),
    "enqueue >= 0.95x raw txn": "{enqueue_split}",
    "transform uncontended >= 0.5x raw txn": (
        "a transform is a read and a transaction, two round trips; with this run's raw get "
        "and raw guarded put, the two at most reach {transform_limit} of the put alone. "
        "The library's own work per call (see below) takes the rest."
    ),
    "8 contenders: RPCs per acquisition <= 4": (
        "a waiter with fewer than three keys ahead reads its turn once more when etcd moved "
        "on between its registration and its watch; further back, a second watch from its "
        "registration's revision, on the same stream, takes that read's place. In a steady "
        "run with 8 contenders every registration finds 7 keys ahead; how many found fewer, "
        "when a worker was descheduled on this 2-core machine, was not counted. The tests "
        "hold it to at most 5 with 2 and with 8 contenders."
    ),
    "8 contenders: handoff p50 < 3 ms": (
        "a handoff is a release, one watch event and one read (the RPCs/op column); its "
        "p50 varies from run to run on this 2-core machine with the same requests, and "
        "where the rest goes has not been traced."
    ),
    "blocked-dequeue wake-up p50 < 3 ms": (
        "a wake-up is one watch event and one take (the RPCs/op column); its p50 varies "
        "from run to run on this 2-core machine with the same requests, and where the "
        "rest goes has not been traced."
    ),
    "4 producers x 4 consumers: >= 2x the items/s of one head per take": (
        "the rate is bound by how many transactions etcd applies per second, and "
        "chained takes cut the transactions per item from 3.6-4.0 to 2.2 (the RPCs/op "
        "column): a gain of about 1.7-1.8x at most, more or less as the run's noise "
        "goes. The exactly-once commit's bookkeeping key is not what limits it: the "
        "enqueue-shaped baselines above measure what it costs etcd, a few points of one "
        "transaction's rate."
    ),
    "8 contenders: handoffs/s >= python-etcd3": (
        "this lock is first come, first served: every acquisition is a handoff to the next "
        "waiter, a release, a watch event and a read. python-etcd3's Lock is not (its "
        "acquisitions per worker in the fairness rows are uneven); how many of its "
        "acquisitions involve a handoff at all was not measured."
    ),
}


def _python_share(raw: float, result: dict[str, Any]) -> str:
    """What the library's own Python work costs, from the raw client's ratio for the same requests."""
    ours = result["extra"].get("ratio", 0.0)
    if ours >= raw:
        return (
            f"the library's own Python work per call did not show against the rounds' "
            f"spread ({ours:.2f}x)"
        )
    share = f"the library's own Python work per call takes the rest, from {raw:.2f}x to {ours:.2f}x"
    ratios = result["extra"].get("ratios") or [ours]
    if min(ratios) <= raw <= max(ratios):
        share += (
            f", though its rounds ranged from {min(ratios):.2f}x to {max(ratios):.2f}x, "
            "across the raw client's: within this run's noise"
        )
    return share


def splits(data: dict[str, Any]) -> dict[str, str]:
    """Where an enqueue's and a lock cycle's time goes, measured in this run."""
    results = data["results"]
    named = {r["name"]: r for r in results}
    shaped = named.get("raw etcd3 txn shaped as an enqueue, with the bookkeeping key")
    lean = named.get("raw etcd3 txn shaped as an enqueue, without the bookkeeping key")
    enqueue = named.get("enqueue")
    profiles = data.get("profiles", {})
    if shaped is None or lean is None or enqueue is None:
        enqueue_split = "the share of each cause was not measured in this run."
    else:
        with_key = shaped["extra"].get("ratio", 0.0)
        without_key = lean["extra"].get("ratio", 0.0)
        enqueue_split = (
            f"the raw client sending an enqueue's own transaction reaches {with_key:.2f}x "
            f"of the raw put, and {without_key:.2f}x without the exactly-once commit's "
            f"bookkeeping key, in this run: the transaction's shape (the queue's compare, "
            f"longer keys) and the bookkeeping key cost about "
            f"{max(0.0, 1 - with_key) * 100:.0f}% together, the key itself "
            f"{(without_key - with_key) * 100:+.0f} points; "
        )
        enqueue_split += _python_share(with_key, enqueue)
        if "enqueue" in profiles:
            enqueue_split += (
                f" ({profiles['enqueue']['wall us per call (profiled)']:.0f} us per call "
                "under the profiler, below)"
            )
        enqueue_split += "."
    lock = profiles.get("lock cycle, uncontended")
    lock_shaped = named.get("raw etcd3 txns shaped as a lock cycle")
    lock_written = named.get(
        "raw etcd3 txns shaped as a lock cycle, with the bookkeeping key written"
    )
    cycle = named.get("lock cycle, uncontended")
    lock_split = ""
    if lock_shaped and lock_written and cycle:
        raw_cycle = lock_shaped["extra"].get("ratio", 0.0)
        raw_written = lock_written["extra"].get("ratio", 0.0)
        lock_split = (
            f"The raw client sending a cycle's own two transactions reaches {raw_cycle:.2f}x "
            f"of the raw put in this run (and {raw_written:.2f}x writing the bookkeeping key "
            f"as well, which a registration does not do): their shape (the "
            f"registration's range and compares, the guarded delete) costs "
            f"{max(0.0, 0.5 - raw_cycle) * 100:.0f} points below 0.5x; "
            f"{_python_share(raw_cycle, cycle)}."
        )
    if lock:
        lock_split += (
            f" Under the profiler, a cycle took {lock['wall us per call (profiled)']:.0f} us."
        )
    get, put = named.get("raw etcd3 get"), named.get("raw etcd3 guarded txn put")
    get_ratio = (
        (median(get["ops_per_s"]) or 0.0) / (median(put["ops_per_s"]) or 1.0)
        if get and put
        else 0.0
    )
    # A read then a transaction: their times add up.
    limit = 1 / (1 / get_ratio + 1) if get_ratio else None
    peer = named.get("python-etcd3 Lock cycle, uncontended")
    peer_ratio = peer["extra"].get("ratio") if peer else None
    return {
        "peer_limit": fmt(0.5 / peer_ratio if peer_ratio else None, "{:.2f}x"),
        "enqueue_split": enqueue_split,
        "lock_split": lock_split,
        "transform_limit": fmt(limit, "{:.2f}x"),
    }


def targets(results: list[dict[str, Any]], baseline: float) -> list[tuple[str, str, bool | None]]:
    """Each target: what was asked, what was measured, and met or not (None: not measured)."""

    def rate(name: str) -> float:
        return median(find(results, name)["ops_per_s"]) or 0.0

    def ratio(name: str) -> float:
        value: float = find(results, name)["extra"].get("ratio", rate(name) / baseline)
        return value

    def shown(name: str) -> str:
        """The ratio, and its spread over rounds."""
        ratios = find(results, name)["extra"].get("ratios") or []
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        return f"{ratio(name):.2f}x{spread}"

    cycle = find(results, "lock cycle, uncontended")
    peer_cycle = ratio("python-etcd3 Lock cycle, uncontended")
    ours8 = find(results, "lock, 8 processes (handoffs/s)")
    peer8 = find(results, "python-etcd3 Lock, 8 processes (handoffs/s)")
    enqueue = find(results, "enqueue")
    prefetch = find(results, "dequeue, prefetch 16")
    many = find(results, "enqueue_many, 100 per call")
    wake = find(results, "blocked dequeue wake-up")
    uncontended = find(results, "transform, uncontended")
    handoff_p50 = percentile(ours8["latencies_ms"], 0.5)
    wake_p50 = percentile(wake["latencies_ms"], 0.5)
    return [
        (
            "uncontended lock cycle: exactly 2 RPCs",
            f"{cycle['rpcs_per_op']:.2f}",
            round(cycle["rpcs_per_op"], 2) == 2.0,
        ),
        (
            "uncontended lock cycle >= 0.45x raw txn",
            shown("lock cycle, uncontended"),
            ratio("lock cycle, uncontended") >= 0.45,
        ),
        (
            "uncontended lock cycle >= 1.4x python-etcd3 Lock",
            f"{ratio('lock cycle, uncontended') / peer_cycle:.2f}x",
            ratio("lock cycle, uncontended") >= 1.4 * peer_cycle,
        ),
        (
            "8 contenders: RPCs per acquisition <= 4",
            f"{ours8['rpcs_per_op']:.2f}",
            round(ours8["rpcs_per_op"], 2) <= 4,
        ),
        (
            "8 contenders: handoffs/s >= python-etcd3",
            f"{rate(ours8['name']):.0f} vs {rate(peer8['name']):.0f}",
            rate(ours8["name"]) >= rate(peer8["name"]),
        ),
        _latency_target("8 contenders: handoff p50 < 3 ms", handoff_p50, 3),
        (
            "enqueue: 1 RPC",
            f"{enqueue['rpcs_per_op']:.2f}",
            round(enqueue["rpcs_per_op"], 2) == 1.0,
        ),
        (
            "enqueue >= 0.95x raw txn",
            shown("enqueue"),
            ratio("enqueue") >= 0.95,
        ),
        (
            "transform uncontended >= 0.5x raw txn",
            shown("transform, uncontended"),
            ratio("transform, uncontended") >= 0.5,
        ),
        (
            "amortised dequeue <= 1.2 RPCs",
            f"{prefetch['rpcs_per_op']:.2f}",
            prefetch["rpcs_per_op"] <= 1.2,
        ),
        (
            "enqueue_many >= 20x the item rate of enqueue",
            f"{rate(many['name']) * 100 / rate('enqueue'):.1f}x",
            rate(many["name"]) * 100 >= 20 * rate("enqueue"),
        ),
        _latency_target("blocked-dequeue wake-up p50 < 3 ms", wake_p50, 3),
        conflict_target(results, uncontended),
        *queue_targets(results),
    ]


def _latency_target(
    target: str, measured: float | None, bound: float
) -> tuple[str, str, bool | None]:
    """A latency below ``bound`` ms; not measured when no latency was recorded."""
    if measured is None:
        return (target, "not measured", None)
    return (target, f"{measured:.2f} ms", measured < bound)


def queue_targets(results: list[dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    """Many consumers and batches: RPCs per item, and the gain of chained takes."""
    named = {r["name"]: r for r in results}
    chained = named.get("4 producers x 4 consumers (items/s)")
    single = named.get("4 producers x 4 consumers, one head per take (items/s)")
    drain = named.get("8 consumers draining a backlog (items/s)")
    batch = named.get("dequeue_many, 100 per call")
    rows: list[tuple[str, str, bool | None]] = []
    target = "4 producers x 4 consumers: <= 2.5 RPCs per item"
    if chained is None:
        rows.append((target, "not measured", None))
    else:
        per_item = chained["rpcs_per_op"]
        rows.append((target, f"{per_item:.2f}", per_item <= 2.5))
    target = "4 producers x 4 consumers: >= 2x the items/s of one head per take"
    if chained is None or single is None:
        rows.append((target, "not measured", None))
    else:
        gain = (median(chained["ops_per_s"]) or 0.0) / (median(single["ops_per_s"]) or 1.0)
        rows.append((target, f"{gain:.2f}x", gain >= 2))
    target = "8 consumers draining a backlog: <= 1.5 RPCs per item"
    if drain is None:
        rows.append((target, "not measured", None))
    else:
        rows.append((target, f"{drain['rpcs_per_op']:.2f}", drain["rpcs_per_op"] <= 1.5))
    target = "dequeue_many(100): <= 3 RPCs per call"
    if batch is None:
        rows.append((target, "not measured", None))
    else:
        rows.append((target, f"{batch['rpcs_per_op']:.2f}", batch["rpcs_per_op"] <= 3))
    return rows


def conflict_target(
    results: list[dict[str, Any]], uncontended: dict[str, Any]
) -> tuple[str, str, bool | None]:
    """RPCs a transform pays per conflict: those of a conflicted call, less an uncontended one's."""
    target = "transform: exactly 1 extra RPC per conflict"
    conflicted = next((r for r in results if r["name"] == "transform, one conflict per call"), None)
    if conflicted is None or conflicted["rpcs_per_op"] is None:
        return target, "not measured", None
    # Each call's meddling writer adds its own put, which is not the transform's.
    extra = (
        conflicted["rpcs_per_op"]
        - conflicted["extra"]["meddling puts per call"]
        - uncontended["rpcs_per_op"]
    )
    return target, f"{extra:.2f}", round(extra, 2) == 1.0


def plot(results: list[dict[str, Any]], images: Path) -> list[str]:
    images.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, prefix in (
        ("transform increments/s", "transform, "),
        ("lock handoffs/s", "lock, "),
        ("python-etcd3 Lock handoffs/s", "python-etcd3 Lock, "),
    ):
        points = sorted(
            (r["extra"]["contenders"], median(r["ops_per_s"]) or 0)
            for r in results
            if r["name"].startswith(prefix) and "contenders" in r["extra"]
        )
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=label)
    axis.set_xlabel("contending processes")
    axis.set_ylabel("per second")
    axis.set_title("Throughput under contention")
    axis.legend()
    figure.tight_layout()
    figure.savefig(images / "throughput-vs-contenders.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4))
    for name in (
        "lock, 8 processes (handoffs/s)",
        "python-etcd3 Lock, 8 processes (handoffs/s)",
        "blocked dequeue wake-up",
    ):
        values = sorted(find(results, name)["latencies_ms"])
        if values:
            axis.plot(
                values, [i / len(values) for i in range(len(values))], label=name.split(" (")[0]
            )
    axis.set_xscale("log")
    axis.set_xlabel("milliseconds")
    axis.set_ylabel("fraction of events")
    axis.set_title("Latency distributions (CDF)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(images / "latency-cdf.png", dpi=100)
    plt.close(figure)
    return ["throughput-vs-contenders.png", "latency-cdf.png"]


def write_report(data: dict[str, Any], report: Path, images: Path) -> None:
    results = data["results"]
    baseline = median(find(results, "raw etcd3 guarded txn put")["ops_per_s"]) or 1.0
    machine = data["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`benchmarks/run.py`); do not edit by hand.",
        "",
        f"- Machine: {machine['platform']}, {machine['cpus']} CPUs, Python {machine['python']}",
        f"- etcd: {machine['etcd']}",
        "- Settings: "
        + (
            ", ".join(f"{k} {v}" for k, v in data["settings"].items())
            if "settings" in data
            else f"{data['rounds']} rounds per single-process case (other settings not recorded)"
        )
        + ".",
        "- The rounds column says how many rounds each case ran; rates are the median round, "
        "with the spread (slowest to fastest round) beside them. Multi-process cases run "
        "once per setting, and count only their steady state: from every worker's start to "
        "every worker's end, after their warm-up and before their shutdown.",
        "- **Ratio** is the rate over the raw etcd3 guarded txn put: for single-process cases, "
        "the median over rounds of each round's rate over a baseline round run just before it; "
        "for the others, over the baseline case of the same run. Absolute rates drift on a "
        "shared machine; ratios and RPC counts much less.",
        "- **RPCs/op** are counted by etcd itself (`grpc_server_started_total`), background "
        "lease keepalives excluded. This library opens a watch stream per wait, which etcd "
        "counts once, and sends all of that wait's watches on it at once, in one round trip "
        "(a lock waiter with three or more keys ahead sends two on its predecessor's key: from the "
        "current revision and from its registration's). python-etcd3 multiplexes all of a "
        "client's watches over one stream and waits for each to be created, so for its Lock "
        "the watches it creates are counted (client-side) in place of its streams.",
        "",
    ]
    for family, title in FAMILIES.items():
        rows = [r for r in results if r["family"] == family]
        if not rows:
            continue
        lines += [
            f"## {title}",
            "",
            "| Case | ops/s | spread | rounds | ratio | RPCs/op | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            rate = median(r["ops_per_s"])
            if rate is None and r["extra"].get("latency only"):
                lines.append(
                    f"| {r['name']} | latency only | | | | | "
                    f"{fmt(percentile(r['latencies_ms'], 0.5), '{:.2f}')} | "
                    f"{fmt(percentile(r['latencies_ms'], 0.99), '{:.2f}')} |"
                )
                continue
            if rate is None:
                lines.append(
                    f"| {r['name']} | not measured: {r['extra'].get('not measured')} | | | | | | |"
                )
                continue
            spread = (
                f"{min(r['ops_per_s']):.0f}-{max(r['ops_per_s']):.0f}"
                if len(r["ops_per_s"]) > 1
                else ""
            )
            lines.append(
                f"| {r['name']} | {rate:.0f} | {spread} | {len(r['ops_per_s'])} | "
                f"{r['extra'].get('ratio', rate / baseline):.2f} | "
                f"{fmt(r['rpcs_per_op'], '{:.2f}')} | {fmt(percentile(r['latencies_ms'], 0.5), '{:.2f}')} | "
                f"{fmt(percentile(r['latencies_ms'], 0.99), '{:.2f}')} |"
            )
        fairness = [r for r in rows if "acquisitions per worker" in r["extra"]]
        if fairness:
            lines += [
                "",
                "Fairness, acquisitions per worker: "
                + "; ".join(
                    f"{r['name'].split(' (')[0]}: {r['extra']['acquisitions per worker']}"
                    for r in fairness
                ),
            ]
        many = [r for r in rows if "items_per_s" in r["extra"]]
        for r in many:
            lines += ["", f"{r['name']}: {r['extra']['items_per_s']:.0f} items/s."]
        lines.append("")
    lines += ["## Targets", "", "| Target | Measured | Met |", "|---|---|---|"]
    missed = []
    for target, measured, met in targets(results, baseline):
        verdict = "not measured" if met is None else "yes" if met else "**no**"
        lines.append(f"| {target} | {measured} | {verdict} |")
        if met is False:
            why = WHY_MISSED.get(target, "no explanation recorded.")
            missed.append(f"- **{target}**: {why.format(**splits(data))}")
    if missed:
        lines += ["", "Why a target was missed:", "", *missed]
    lines += profile_section(data.get("profiles", {}))
    lines += ["", "## Plots", ""]
    for image in plot(results, images):
        lines.append(f"![{image}](img/{image})")
        lines.append("")
    report.write_text("\n".join(lines).rstrip() + "\n")


def profile_section(profiles: dict[str, Any]) -> list[str]:
    """cProfile's top entries per call, by own time: where the library's time goes."""
    if not profiles:
        return []
    lines = [
        "",
        "## Where the time goes",
        "",
        "cProfile's top entries by own time, per call, in the same process as the rest of "
        "the run (the profiler itself slows each call). `_blocking` in gRPC's `_channel.py` "
        "is the wait for etcd's answer, network and etcd's own work included; the rest is "
        "Python work on this side.",
    ]
    for name, profile in profiles.items():
        lines += [
            "",
            f"**{name}**: {profile['wall us per call (profiled)']:.0f} us per call, profiled, "
            f"over {profile['calls']} calls.",
            "",
            "| Function | Calls per call | Own us per call | Cumulative us per call |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{entry['function']}` | {entry['calls per call']:.1f} | "
            f"{entry['own us per call']:.1f} | {entry['cumulative us per call']:.1f} |"
            for entry in profile["top"]
        ]
    return lines


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    data = json.loads((root / "benchmarks" / "results" / "latest.json").read_text())
    write_report(data, root / "docs" / "benchmarks.md", root / "docs" / "img")
    sys.exit(0)
