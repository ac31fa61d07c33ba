"""Runs every Python block of README.md and docs/ against a throwaway etcd.

pytest-markdown-docs (``--markdown-docs``, set in pyproject.toml) makes each
block a test. Before each one, etcd is emptied (so they are skipped against an
external etcd named by ``ETCD_ENDPOINTS``); the block's
`EtcdPatterns.connect` to the docs' placeholder addresses (port 2379) goes
to the test's etcd instead, and a connected instance is there already as
``etcd``, with ``cluster`` the etcd it runs on (and `EtcdPatterns`
imported). The functions the examples
call for the application's own work (``handle``, ``process``...) are
stand-ins that do nothing. A block that cannot run here (it needs
certificates, or a package the project does not depend on) follows the
comment ``<!-- not run: why -->``, and is skipped with that reason.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import etcd3
import pytest
from etcd3 import etcdrpc

from etcd_patterns import EtcdPatterns
from etcd_patterns.testing import EtcdCluster, ExternalEtcd, external_from_environment

_NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
_globals: dict[str, Any] = {}


def _is_doc(item: pytest.Item) -> bool:
    return type(item).__name__ == "MarkdownInlinePythonItem"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip a block after a "not run" comment; bound every block's time."""
    for item in items:
        if not _is_doc(item):
            continue
        lines = Path(item.path).read_text().splitlines()
        fence = getattr(item, "start_line", 1)  # the line of the block's opening fence, from 1
        before = [line for line in lines[: max(0, fence - 1)] if line.strip()]
        found = _NOT_RUN.search(before[-1]) if before else None
        if found:
            item.add_marker(pytest.mark.skip(reason=found.group(1)))
        item.add_marker(pytest.mark.timeout(60))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """Set up a block's etcd and globals before pytest-markdown-docs reads them."""
    # The block's globals are taken before its fixtures are set up: set
    # this one up first.
    if _is_doc(item):
        item.fixture_request.getfixturevalue("_docs_etcd")  # type: ignore[attr-defined]


def pytest_markdown_docs_globals() -> dict[str, Any]:
    """The globals of the block about to run."""
    return dict(_globals)


def _placeholder(endpoints: str | Sequence[str] | None) -> bool:
    """Whether ``endpoints`` are the docs' made-up addresses, rather than a cluster's own."""
    text = endpoints if isinstance(endpoints, str) else ",".join(endpoints or ())
    return ":2379" in text


def _nothing(*_args: object, **_kwargs: object) -> str:
    return "done"


@pytest.fixture(autouse=True)
def _docs_etcd(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not _is_doc(request.node):
        yield
        return
    if external_from_environment() is not None:
        # A block starts by emptying etcd: never someone's own cluster.
        pytest.skip("the docs' examples run only against a throwaway etcd, which they empty")
    server: EtcdCluster | ExternalEtcd = request.getfixturevalue("etcd_server")
    host, port = server.endpoints[0].rsplit(":", 1)
    client = etcd3.client(host=host.strip("[]"), port=int(port), timeout=10)
    try:  # every key of the blocks before goes
        client.kvstub.DeleteRange(etcdrpc.DeleteRangeRequest(key=b"\0", range_end=b"\0"), 10)
    finally:
        client.close()
    opened: list[EtcdPatterns] = []
    connect = EtcdPatterns.connect.__func__  # type: ignore[attr-defined]

    def redirected(
        cls: type[EtcdPatterns], /, endpoints: str | Sequence[str] | None = None, **kwargs: Any
    ) -> EtcdPatterns:
        if _placeholder(endpoints):
            endpoints = server.endpoints
        instance: EtcdPatterns = connect(cls, endpoints, **kwargs)
        opened.append(instance)
        return instance

    monkeypatch.setattr(EtcdPatterns, "connect", classmethod(redirected))
    shutting_down = threading.Event()
    shutting_down.set()  # the examples' follow loops stop after one state
    _globals.clear()
    _globals.update(
        etcd=EtcdPatterns.connect("127.0.0.1:2379", namespace="/app/"),
        EtcdPatterns=EtcdPatterns,
        cluster=server,
        shutting_down=shutting_down,
        today="2026-12-01",
        data=b"report",
        storage=type("Storage", (), {"write": staticmethod(_nothing)})(),
        **{
            name: _nothing
            for name in (
                "apply",
                "build_report",
                "compute",
                "handle",
                "process",
                "rebalance",
                "rebalance_to",
                "run_my_worker",
                "run_the_worker",
            )
        },
    )
    try:
        yield
    finally:
        _globals.clear()
        for instance in opened:
            instance.close()
