"""CPU time of processes on this machine, read from Linux's /proc: the one place the benchmarks
read it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    command: str
    ppid: int
    cpu_seconds: float  # user + system, this process's own (not its children's)


def read_stat(pid: int | str) -> ProcStat | None:
    """One process's /proc/PID/stat, or None when it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return ProcStat(
        pid=int(pid),
        command=text[text.index("(") + 1 : text.rindex(")")],
        ppid=int(fields[1]),
        cpu_seconds=(int(fields[11]) + int(fields[12])) / CLOCK_TICKS,  # utime + stime
    )


def processes() -> Iterator[ProcStat]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := read_stat(entry.name)) is not None:
            yield stat


def tree(root: int) -> list[ProcStat]:
    """`root` and every live descendant: a server's workers and its projections' child, which
    runs in a session of its own (so a process group would miss it)."""
    children: dict[int, list[ProcStat]] = {}
    by_pid: dict[int, ProcStat] = {}
    for stat in processes():
        by_pid[stat.pid] = stat
        children.setdefault(stat.ppid, []).append(stat)
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        if pid in by_pid:
            found.append(by_pid[pid])
        pending += [child.pid for child in children.get(pid, [])]
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU of `root` and every live descendant (`tree`)."""
    return sum(stat.cpu_seconds for stat in tree(root))


def command_line(pid: int) -> list[str]:
    """A process's arguments, or [] when it has gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class PostgresProcesses:
    """CPU of every `postgres` process on the machine (others' work too). The list of pids is
    read at most once a second: the rebuild asks twice per step, and scanning every process each
    time (1.3 ms) cost about 30 s of a 1,000,000-event rebuild's own time."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.read_at = float("-inf")

    def cpu_seconds(self) -> float:
        if time.monotonic() - self.read_at > 1.0:
            self.pids = [stat.pid for stat in processes() if stat.command == "postgres"]
            self.read_at = time.monotonic()
        return sum(stat.cpu_seconds for pid in self.pids if (stat := read_stat(pid)) is not None)


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS
