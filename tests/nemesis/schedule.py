"""The nemesis: a fault schedule drawn from a seed, played against a proxied cluster.

The same seed, duration and cluster size give the same schedule. Faults
come one at a time, each for a drawn while, and every one heals before
`Nemesis.run` returns. Each strikes one member (never a majority), but for
``drop-answers-all``: the client's own network cutting answers, whichever
member it talks to, while etcd stays healthy. That is what leaves a write
in doubt even after the library tried to settle it, and so exercises every
path that reports `OutcomeUnknownError`.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import etcd3
from etcd3 import etcdrpc

from etcd_patterns.testing import EtcdCluster, EtcdNode

KINDS = (
    "blackhole-client",
    "delay-client",
    "drop-answers",
    "reset-client",
    "blackhole-peer",
    "kill",
    "pause",
    "move-leader",
    "revoke-lease",
    "compact",
    "drop-answers-all",
)


@dataclass(frozen=True)
class Fault:
    """One fault: what, against which member, when (from the start) and for how long."""

    kind: str
    member: int
    start: float
    duration: float


def draw(seed: int, duration: float, members: int, kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    """A schedule of faults filling ``duration`` seconds, from ``seed``."""
    chance = random.Random(seed)
    faults: list[Fault] = []
    at = chance.uniform(0.5, 1.5)
    while True:
        length = chance.uniform(0.3, 2.5)
        if at + length > duration - 0.5:
            return faults
        faults.append(Fault(chance.choice(kinds), chance.randrange(members), at, length))
        at += length + chance.uniform(0.3, 1.5)


class Nemesis:
    """Plays a schedule against ``cluster`` in a thread; `stop` heals everything.

    Args:
        cluster: A ``proxied`` cluster.
        schedule: From `draw`.
    """

    def __init__(self, cluster: EtcdCluster, schedule: list[Fault]) -> None:
        self.cluster = cluster
        self.schedule = schedule
        self.injected: Counter[str] = Counter()
        self.log: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nemesis", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop early if need be, and wait until every fault has healed."""
        self._stop.set()
        self._thread.join()
        self._heal_all()

    def _run(self) -> None:
        began = time.monotonic()
        for fault in self.schedule:
            if self._stop.wait(max(0.0, began + fault.start - time.monotonic())):
                return
            heal = self._inject(fault)
            self.injected[fault.kind] += 1
            self.log.append(f"{time.monotonic() - began:7.2f}s {fault.kind} node{fault.member}")
            self._stop.wait(fault.duration)
            heal()

    def _inject(self, fault: Fault) -> Any:
        """Strike; return what heals the fault."""
        node = self.cluster.nodes[fault.member]
        if node.proxy is None or node.peer_proxy is None:
            raise ValueError("the nemesis needs a proxied cluster")
        if fault.kind.endswith(("-client", "-peer")) or fault.kind.startswith("drop-answers"):
            return self._cut(fault.kind, node)
        if fault.kind == "kill":
            node.kill()
            return lambda: self._restart(node)
        if fault.kind == "pause":
            node.pause()
            return node.resume
        if fault.kind == "move-leader":
            self._admin(lambda client: _move_leader(self.cluster, client, fault.member))
        elif fault.kind == "revoke-lease":
            self._admin(lambda client: _revoke_one_lease(client, fault.member))
        elif fault.kind == "compact":
            self._admin(_compact)
        else:
            raise ValueError(f"unknown fault {fault.kind!r}")
        return lambda: None

    def _cut(self, kind: str, node: EtcdNode) -> Any:
        """A network fault, through the proxies; what heals it."""
        proxy, peer = node.proxy, node.peer_proxy
        assert proxy is not None  # checked by _inject
        assert peer is not None
        if kind == "blackhole-client":
            proxy.blackhole()
            return proxy.heal
        if kind == "delay-client":
            proxy.delay(0.05, jitter=0.2)
            return proxy.heal
        if kind == "drop-answers":
            proxy.drop_answers()
            return proxy.heal
        if kind == "drop-answers-all":
            proxies = [other.proxy for other in self.cluster.nodes if other.proxy is not None]
            for each in proxies:
                each.drop_answers()

            def heal_every() -> None:
                for each in proxies:
                    each.heal()

            return heal_every
        if kind == "reset-client":
            proxy.reset()
            return lambda: None
        if kind == "blackhole-peer":
            peer.blackhole()
            peer.reset()  # established raft streams stop too
            return peer.heal
        raise ValueError(f"unknown fault {kind!r}")

    def _restart(self, node: EtcdNode) -> None:
        node.start(wait=False)

    def _admin(self, action: Any) -> None:
        """Run an administrative request on a healthy member, directly."""
        for node in self.cluster.nodes:
            if not node.healthy():
                continue
            host, port = node.endpoint.rsplit(":", 1)
            client = etcd3.client(host=host, port=int(port), timeout=5)
            try:
                action(client)
                return
            except Exception as exc:  # a fault that could not be made is logged, not fatal
                self.log.append(f"  admin request failed on {node.name}: {exc!r}")
            finally:
                client.close()

    def _heal_all(self) -> None:
        for node in self.cluster.nodes:
            for proxy in (node.proxy, node.peer_proxy):
                if proxy is not None:
                    proxy.heal()
            if node.running:
                node.resume()
            else:
                node.start(wait=False)
        for node in self.cluster.nodes:
            node.wait_healthy()


def _move_leader(cluster: EtcdCluster, client: Any, member: int) -> None:
    members = client.clusterstub.MemberList(etcdrpc.MemberListRequest(), 5).members
    target = next(m.ID for m in members if m.name == cluster.nodes[member].name)
    leader = cluster.leader(timeout=5)
    host, port = leader.endpoint.rsplit(":", 1)
    at_leader = etcd3.client(host=host, port=int(port), timeout=5)
    try:
        at_leader.maintenancestub.MoveLeader(etcdrpc.MoveLeaderRequest(targetID=target), 5)
    finally:
        at_leader.close()


def _revoke_one_lease(client: Any, pick: int) -> None:
    """Revoke a lease that some key carries: what etcd does to a starved keepalive."""
    every_key = etcdrpc.RangeRequest(key=b"\0", range_end=b"\0", keys_only=True)
    leases = sorted({kv.lease for kv in client.kvstub.Range(every_key, 5).kvs if kv.lease})
    if leases:
        chosen = leases[pick % len(leases)]
        client.leasestub.LeaseRevoke(etcdrpc.LeaseRevokeRequest(ID=chosen), 5)


def _compact(client: Any) -> None:
    revision = client.kvstub.Range(etcdrpc.RangeRequest(key=b"\0", count_only=True), 5)
    client.kvstub.Compact(etcdrpc.CompactionRequest(revision=revision.header.revision), 5)
