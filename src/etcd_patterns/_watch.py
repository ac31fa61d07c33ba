"""Watched values: a key's value, or its directory's values, each time they change.

Protocol:

1. Read as `get_values` does, in one round trip, at some revision, and
   yield the values.
2. In the shared wait loop (`_wait.changes`), watch the key and the range
   of its children from the current revision, until an event on the key
   itself or on a direct child; read again, and yield if the values differ
   from those last yielded.

Guarantees:

* Every state yielded is one that etcd held: each comes from one read.
* The latest state is never missed. Changes in between may coalesce, and
  a change that is undone before the next read is not yielded, since the
  values are the same as before.
* It survives failover and compaction: a watch that breaks, or that etcd
  cancels because its start was compacted away, is followed by a fresh
  read, which is yielded if it differs.
* ``timeout`` bounds the wait for each next change; it then raises
  `WatchTimeoutError`. It holds no thread of its own: it runs while the
  caller iterates, and closing the iterator ends it.

Cost: one read and one watch stream to begin; then one read per change (a
burst of changes costs one read), plus one read when etcd moved on between
a read and the watch that follows it.

Lease loss: it holds no lease.
"""

from __future__ import annotations

from collections.abc import Generator

from ._errors import WatchTimeoutError
from ._keys import Keyspace
from ._kv import KeyValue
from ._retry import check_timeout
from ._transport import Transport
from ._wait import changes, children_watch


class Watcher:
    """Watched values over one transport and namespace.

    Args:
        transport: Opens the watches.
        keyspace: Maps keys to etcd keys.
        kv: Reads the values.
    """

    def __init__(self, transport: Transport, keyspace: Keyspace, kv: KeyValue) -> None:
        self._transport = transport
        self._keyspace = keyspace
        self._kv = kv

    def watch_values(
        self, key: object, *, timeout: object = None
    ) -> Generator[list[str], None, None]:
        """See `EtcdPatterns.watch_values`."""
        raw = self._keyspace.encode(key)
        wait_for = check_timeout(timeout)
        watch = children_watch(raw, itself=True)
        return changes(
            self._transport,
            lambda: self._kv.read_values(raw),
            view=lambda state: state.values,
            watch=lambda _state: watch,
            timeout=wait_for,
            timeout_error=lambda: WatchTimeoutError(
                f"{self._keyspace.decode(raw)!r} did not change in time"
            ),
        )
