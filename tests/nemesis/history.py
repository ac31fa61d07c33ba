"""Recorded operations: invoked, then ok, failed or unknown."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from etcd_patterns import EtcdPatternsError, OutcomeUnknownError

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"


@dataclass
class Op:
    """One operation of one client process.

    Attributes:
        process: Which client.
        kind: What it did: "incr", "read", "section", "enqueue", "dequeue", "claim".
        invoke: When it began (time.monotonic, one clock for every process).
        complete: When it returned or raised.
        outcome: OK, FAIL (nothing happened) or UNKNOWN (it may have).
        value: What it wrote or received, if anything.
        bound: The longest the call was allowed to take, in seconds.
        info: Anything else a checker needs (a fencing token, a loss).
        error: The exception's type, if one was raised.
    """

    process: str
    kind: str
    invoke: float
    complete: float = 0.0
    outcome: str = OK
    value: Any = None
    bound: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    error: str = ""


class Recorder:
    """Appends a process's operations, one JSON line each, to a file."""

    def __init__(self, path: Path, process: str) -> None:
        self.path = path
        self.process = process
        self._file = path.open("a")

    def close(self) -> None:
        self._file.close()

    def record(self, op: Op) -> None:
        """Write an operation whose times and outcome the caller has set."""
        self._file.write(json.dumps(asdict(op)) + "\n")
        self._file.flush()

    @contextmanager
    def op(self, kind: str, *, value: Any = None, bound: float | None = None) -> Iterator[Op]:
        """Record one call: the block is the call; its exception sets the outcome.

        `OutcomeUnknownError` is UNKNOWN; any other library error is FAIL; the
        block may also set ``outcome`` itself. Library errors are swallowed.
        """
        op = Op(self.process, kind, time.monotonic(), value=value, bound=bound)
        try:
            yield op
        except OutcomeUnknownError as exc:
            op.outcome, op.error = UNKNOWN, type(exc).__name__
            op.info.setdefault("uncertain", list(exc.uncertain))
            op.info.setdefault("taken", list(exc.taken))
        except EtcdPatternsError as exc:
            op.outcome, op.error = FAIL, type(exc).__name__
        finally:
            op.complete = time.monotonic()
            self.record(op)


def load(directory: Path) -> list[Op]:
    """Every operation recorded in ``directory``, in order of invocation."""
    ops = [
        Op(**json.loads(line))
        for path in sorted(directory.glob("*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    return sorted(ops, key=lambda op: op.invoke)
