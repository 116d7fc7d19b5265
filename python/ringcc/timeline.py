"""A per-rank Chrome-trace timeline of ringcc.DistributedDataParallel's gradient sync.

Set ``RINGCC_TIMELINE=/path/prefix`` before wrapping a model; each rank then writes
``/path/prefix.rank{R}.json`` in the Chrome trace event format (open it in
chrome://tracing or https://ui.perfetto.dev)::

    {"traceEvents": [{"name": "allreduce", "ph": "X", "ts": ..., "dur": ..., "pid": R,
                      "tid": 2, "args": {"bucket": 0, "step": 3}}, ...]}

Events are complete ("X") events with ``ts``/``dur`` in microseconds on one clock per
process (``time.perf_counter_ns`` since the Timeline was made), ``pid`` is the rank and
each kind of work has its own row (tid): backward, pack, allreduce, unpack.

The file is valid JSON after every flush: new events are written over the closing
``]}`` and the closing is written again, so a flush costs only the events since the
last one (no rewrite of the whole file as it grows).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Dict, List, Optional

ENV_VAR = "RINGCC_TIMELINE"

#: Row (Chrome "tid") of each kind of event; the names appear in the viewer.
TIDS = {"backward": 0, "pack": 1, "allreduce": 2, "unpack": 3}

_TAIL = "\n]}\n"


class Timeline:
    """Collects complete events for one rank and appends them to its trace file."""

    def __init__(self, prefix: str, rank: int):
        self.path = f"{prefix}.rank{rank}.json"
        self.rank = rank
        self._t0 = time.perf_counter_ns()
        self._lock = threading.Lock()  # future callbacks record from settler threads
        self._pending: List[Dict[str, Any]] = []
        self._written = 0  # events already in the file
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        meta = [{"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}}]
        meta += [{"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}}
                 for name, tid in TIDS.items()]
        with open(self.path, "w") as f:
            f.write('{"traceEvents": [\n' + ",\n".join(json.dumps(e) for e in meta) + _TAIL)
        self._written = len(meta)

    @classmethod
    def from_env(cls, rank: int) -> Optional["Timeline"]:
        """A Timeline when ``RINGCC_TIMELINE`` is set (non-empty), else None."""
        prefix = os.environ.get(ENV_VAR, "")
        return cls(prefix, rank) if prefix else None

    def now(self) -> float:
        """Microseconds since this Timeline was made (fractional: ns resolution)."""
        return (time.perf_counter_ns() - self._t0) / 1000.0

    def complete(self, kind: str, start_us: float, end_us: float, **args: Any) -> None:
        """Record one "X" event of ``kind`` (a key of TIDS) from start to end."""
        event = {"name": kind, "cat": "ddp", "ph": "X", "ts": start_us, "dur": max(end_us - start_us, 0.0),
                 "pid": self.rank, "tid": TIDS[kind], "args": args}
        with self._lock:
            self._pending.append(event)

    def flush(self) -> None:
        """Append the events recorded since the last flush; the file stays valid JSON."""
        with self._lock:
            events, self._pending = self._pending, []
        if not events:
            return
        text = "".join(",\n" + json.dumps(e) for e in events)
        with open(self.path, "r+") as f:
            f.seek(0, os.SEEK_END)
            f.seek(f.tell() - len(_TAIL))  # over the closing "]}"
            f.write(text + _TAIL)
        self._written += len(events)


__all__ = ["Timeline", "ENV_VAR", "TIDS"]
