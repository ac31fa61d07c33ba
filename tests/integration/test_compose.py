"""docker-compose.yml is run for real, with a local etcd instead of Docker.

Each service's etcd command line is taken from the YAML, its addresses and
data directory remapped to loopback and a temporary directory, and every
other flag kept as written. The cluster must form and replicate.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from etcd_patterns import EtcdPatterns
from etcd_patterns.testing import EtcdNode, find_etcd_binary, free_ports

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
REMAPPED = {
    "data-dir",
    "listen-client-urls",
    "advertise-client-urls",
    "listen-peer-urls",
    "initial-advertise-peer-urls",
    "initial-cluster",
}


def load() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def flags(command: list[str]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    args = iter(command[1:])
    for arg in args:
        assert arg.startswith("--"), f"unexpected argument {arg!r}"
        name, sep, value = arg[2:].partition("=")
        parsed[name] = value if sep else next(args)
    return parsed


def test_the_file_pins_an_official_etcd_image_with_published_client_ports() -> None:
    services = load()
    assert len(services) == 3
    host_ports = set()
    for service in services.values():
        assert re.fullmatch(r"gcr\.io/etcd-development/etcd:v3\.[56]\.\d+", service["image"])
        (published,) = service["ports"]
        host, container = published.split(":")
        assert container == "2379"
        host_ports.add(host)
        assert service["command"][0].endswith("/etcd")
    assert len(host_ports) == 3


@pytest.fixture
def compose_nodes(tmp_path: Path) -> Iterator[list[EtcdNode]]:
    services = load()
    ports = iter(free_ports(2 * len(services)))
    local = {name: (next(ports), next(ports)) for name in services}

    def peer_url(url: str) -> str:
        return f"http://127.0.0.1:{local[urlsplit(url).hostname or ''][1]}"

    nodes = []
    for name, service in services.items():
        given = flags(service["command"])
        client = f"http://127.0.0.1:{local[name][0]}"
        members = dict(item.split("=", 1) for item in given["initial-cluster"].split(","))
        argv = [find_etcd_binary()]
        argv += [f"--{flag}={value}" for flag, value in given.items() if flag not in REMAPPED]
        argv += [
            f"--data-dir={tmp_path / name}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer_url(given['listen-peer-urls'].replace('0.0.0.0', name))}",
            f"--initial-advertise-peer-urls={peer_url(given['initial-advertise-peer-urls'])}",
            "--initial-cluster="
            + ",".join(f"{member}={peer_url(url)}" for member, url in members.items()),
        ]
        nodes.append(
            EtcdNode(argv, name=given["name"], client_url=client, log_path=tmp_path / f"{name}.log")
        )
    yield nodes
    for node in nodes:
        node.kill()


@pytest.mark.timeout(90)
def test_the_compose_cluster_forms_and_replicates(compose_nodes: list[EtcdNode]) -> None:
    for node in compose_nodes:
        node.start(wait=False)
    for node in compose_nodes:
        node.wait_healthy()
    with EtcdPatterns.connect([n.endpoint for n in compose_nodes], namespace="/compose/") as etcd:
        assert etcd.transform("n", lambda v: str(int(v) + 1), default="0") == "1"
    for node in compose_nodes:
        with EtcdPatterns.connect(node.endpoint, namespace="/compose/") as one:
            assert one.get_values("n") == ["1"]
    assert sum(node.is_leader() for node in compose_nodes) == 1
