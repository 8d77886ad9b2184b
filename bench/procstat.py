"""CPU time and RSS of a process tree, read from /proc (Linux)."""
from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [c for child in (task / "children").read_text().split() for c in tree(int(child))]
        except OSError:
            pass
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / _TICK


def rss_bytes(pid: int) -> dict[int, int]:
    out = {}
    for p in tree(pid):
        try:
            out[p] = int(Path(f"/proc/{p}/statm").read_text().split()[1]) * _PAGE
        except OSError:
            pass
    return out
