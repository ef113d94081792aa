"""The search log: one JSON line per finished trial, appended and flushed as it finishes.

The first line is a header with the model and spec hashes; ``resume`` refuses
a log written for another model or spec. A search killed with ``kill -9``
loses at most the trial in flight (a torn last line is ignored).
"""
from __future__ import annotations

import json
import os

from ..errors import SearchError

VERSION = 1


def read_log(path: str, model_hash: str, spec_hash: str) -> list[dict]:
    """Finished trials of a log, after checking it belongs to this model and spec."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines:
        return []
    try:
        header = json.loads(lines[0])
    except ValueError:
        raise SearchError(f"{path}: not a hago search log (bad first line)") from None
    if header.get("type") != "header":
        raise SearchError(f"{path}: not a hago search log (no header line)")
    if header.get("model_hash") != model_hash:
        raise SearchError(f"{path}: this log is from another model (hash {header.get('model_hash')}, "
                          f"this model is {model_hash}); use a new log file")
    if header.get("spec_hash") != spec_hash:
        raise SearchError(f"{path}: this log is from another hardware spec ({header.get('spec')}, hash "
                          f"{header.get('spec_hash')}; this spec hash is {spec_hash}); use a new log file")
    for line in lines[1:]:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # the trial in flight when the process was killed
        if r.get("type") == "trial":
            rows.append(r)
        elif r.get("type") == "confirm":  # a finalist re-measured: its latency is the median of the rounds
            for row in rows:
                if row.get("key") == r.get("key"):
                    row["latency_ms"], row["confirmed"] = r.get("latency_ms"), r.get("confirmed", 0)
    return rows


class TrialLog:
    def __init__(self, path: str | None, header: dict, append: bool):
        self.path = path
        if path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if not append or not os.path.exists(path) or os.path.getsize(path) == 0:
            with open(path, "w") as f:
                f.write(json.dumps({"type": "header", "version": VERSION, **header}) + "\n")
        else:  # drop a torn last line (the trial in flight when the process was killed)
            with open(path) as f:
                lines = f.read().splitlines()
            good = []
            for line in lines:
                try:
                    json.loads(line)
                    good.append(line)
                except ValueError:
                    continue
            if len(good) != len(lines):
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    f.write("\n".join(good) + "\n")
                os.replace(tmp, path)

    def append(self, row: dict, kind: str = "trial") -> None:
        """Append one record (``trial``, or ``confirm`` for a finalist's re-measured latency) and fsync."""
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"type": kind, **row}) + "\n")
            f.flush()
            os.fsync(f.fileno())
