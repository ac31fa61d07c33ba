"""A TCP proxy that injects network faults between a client and an etcd member.

Put one in front of a member's client URL (or its peer URL), point clients at
`FaultProxy.address`, and switch faults on and off while they run:

* `blackhole`: accept connections and bytes, and hold them: nothing is
  forwarded or answered until `heal`, which delivers what was held, in
  order. This is a hung member, or a partition: TCP loses no bytes, it
  retransmits them until the network heals, so a request sent into a
  blackhole may still reach etcd, late.
* `delay`: hold every chunk for a fixed delay plus random jitter, per
  direction.
* `drop_answers`: forward requests to etcd, then cut the connection as the
  answer comes back, before the client sees it: etcd applied the request
  and the client cannot know. Only the start of an answer (an HTTP/2
  HEADERS frame on a request's stream) is cut; what etcd sends unasked
  (settings, pings, window updates) still passes, so connections keep
  being made. This needs plain-text gRPC, not TLS.
* `reset`: cut every open connection now.

`heal` ends them all. Every fault counts what it did in `FaultProxy.stats`,
so a test can assert that its fault fired.

It is plain threads and sockets, with no dependency, and carries any TCP
protocol. Of HTTP/2 it reads only the frame headers etcd sends, to find
where answers begin.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from types import TracebackType

__all__ = ["FaultProxy"]

_CHUNK = 65536
_FRAME_HEADER = 9  # HTTP/2: length (3 bytes), type, flags, stream id (4 bytes)
_HEADERS = 0x1


@dataclass(frozen=True)
class _Mode:
    blackhole: bool = False
    drop_answers: bool = False
    delay: float = 0.0
    jitter: float = 0.0


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        # etcd's bytes not yet split into HTTP/2 frames.
        self.pending = b""
        # Whether the client sent bytes since etcd last did (without HTTP/2).
        self.asked = False
        self.closed = threading.Event()

    def answer_begins(self, data: bytes) -> bool:
        """Whether ``data``, from etcd, starts an answer (a HEADERS frame on a stream)."""
        buffer = self.pending + data
        position = 0
        begins = False
        while len(buffer) - position >= _FRAME_HEADER:
            length = int.from_bytes(buffer[position : position + 3], "big")
            kind = buffer[position + 3]
            stream = int.from_bytes(buffer[position + 5 : position + 9], "big") & 0x7FFFFFFF
            if kind == _HEADERS and stream != 0:
                begins = True
            if len(buffer) - position < _FRAME_HEADER + length:
                break
            position += _FRAME_HEADER + length
        self.pending = buffer[position:]
        return begins

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()


class FaultProxy:
    """Forwards TCP connections from a local port to ``target``, with faults.

    Args:
        target: ``(host, port)`` to forward to.
        listen: ``(host, port)`` to listen on; port 0 picks a free one.
        seed: Seeds the delay jitter, so that a run can be repeated.
        http2: Whether the traffic is plain-text HTTP/2 (gRPC), whose frames
            `drop_answers` needs to find where answers begin. etcd's peer
            traffic is not: there, `drop_answers` cuts a connection at the
            first bytes back after a request.

    Example::

        with FaultProxy(("127.0.0.1", 2379)) as proxy:
            etcd = EtcdPatterns.connect(proxy.endpoint, timeout=1)
            proxy.blackhole()
            ...  # requests through the proxy now time out
            proxy.heal()
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        seed: int | None = None,
        http2: bool = True,
    ) -> None:
        self.target = target
        self.http2 = http2
        self._server = socket.create_server(listen, reuse_port=False)
        self._server.settimeout(0.2)
        host, port = self._server.getsockname()[:2]
        self.address: tuple[str, int] = (host, port)
        self.stats: Counter[str] = Counter()
        self._mode = _Mode()
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._random = random.Random(seed)
        self._stop = threading.Event()
        self._acceptor = threading.Thread(
            target=self._accept, name=f"fault-proxy-{port}", daemon=True
        )
        self._acceptor.start()

    def __repr__(self) -> str:
        return f"<FaultProxy {self.endpoint} -> {self.target[0]}:{self.target[1]} {self._mode}>"

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        """``host:port`` of the proxy, for clients."""
        return f"{self.address[0]}:{self.address[1]}"

    # -- faults -------------------------------------------------------------

    def blackhole(self) -> None:
        """Hold every byte, both ways, until `heal` delivers them."""
        self._set(_Mode(blackhole=True))
        self.stats["blackhole"] += 1

    def delay(self, seconds: float, jitter: float = 0.0) -> None:
        """Hold every chunk, both ways, ``seconds`` plus up to ``jitter`` more."""
        self._set(_Mode(delay=seconds, jitter=jitter))
        self.stats["delay"] += 1

    def drop_answers(self) -> None:
        """Cut each connection as etcd answers a request sent through it."""
        self._set(_Mode(drop_answers=True))
        self.stats["drop_answers"] += 1

    def reset(self) -> None:
        """Cut every open connection now; the mode stays as it is."""
        with self._lock:
            links, self._links = list(self._links), set()
        for link in links:
            link.close()
        self.stats["reset"] += 1
        self.stats["connections cut"] += len(links)

    def heal(self) -> None:
        """End every fault: forward everything, held bytes first."""
        self._set(_Mode())

    def close(self) -> None:
        """Stop listening and cut every connection."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._server.close()
        self._acceptor.join(timeout=5)
        with self._lock:
            links, self._links = list(self._links), set()
        for link in links:
            link.close()

    # -- machinery ----------------------------------------------------------

    def _set(self, mode: _Mode) -> None:
        with self._changed:
            self._mode = mode
            self._changed.notify_all()

    def _hold(self, link: _Link) -> _Mode:
        """Wait while the proxy is a blackhole; return the mode that ended it."""
        with self._changed:
            while self._mode.blackhole and not link.closed.is_set():
                # Woken by a change of mode; the timeout notices a closed link.
                self._changed.wait(0.1)
            return self._mode

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream: socket.socket | None
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                upstream = None  # the member is down: the client sees a cut
            link = _Link(client, upstream)
            if upstream is None:
                link.close()
                continue
            with self._lock:
                self._links.add(link)
            for source, sink, answer in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(
                    target=self._pump,
                    args=(link, source, sink, answer),
                    name="fault-proxy-pump",
                    daemon=True,
                ).start()

    def _pump(self, link: _Link, source: socket.socket, sink: socket.socket, answer: bool) -> None:
        try:
            while not link.closed.is_set():
                data = source.recv(_CHUNK)
                if not data:
                    break
                mode = self._mode
                # Frames are tracked in every mode, so that a drop switched
                # on mid-connection still knows where they start.
                if not answer:
                    link.asked = True
                    begins = False
                elif self.http2:
                    begins = link.answer_begins(data)
                else:
                    begins, link.asked = link.asked, False
                if mode.blackhole:
                    self.stats["bytes held"] += len(data)
                    mode = self._hold(link)
                    if link.closed.is_set():
                        break
                if mode.delay or mode.jitter:
                    time.sleep(mode.delay + self._random.uniform(0, mode.jitter))
                    self.stats["chunks delayed"] += 1
                if mode.drop_answers and begins:
                    self.stats["answers dropped"] += 1
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._links.discard(link)
            link.close()
