"""How many torch threads a training run uses, chosen from what else is running on the machine.

Measured on a 2-core machine (tiny preset, fwd + bwd + AdamW, batch 16; docs in README "Training speed"):
two processes with 2 OpenMP threads each on 2 cores fall from ~16-20 to ~0.8 images/s each (the threads of
one process wait at every parallel region's barrier for a thread the kernel has given to the other process;
OMP_WAIT_POLICY=PASSIVE only lifts that to 4.1), while 1 thread each gives ~12 images/s each. So a run takes
the cores nobody else is using: ``train.threads: auto`` looks at the machine's busy time that is not this
run's (its own process and its loader workers) every ``check_every`` optimizer steps and sets
torch.set_num_threads to the free cores (at least 1). An explicit number, or OMP_NUM_THREADS in the
environment, fixes the count instead.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_ticks() -> int | None:
    """Busy jiffies of all CPUs since boot (user + nice + system + irq + softirq + steal), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle


def process_tree_ticks(root: int | None = None) -> int:
    """CPU jiffies (user + system) of ``root`` (this process) and its live children (loader workers)."""
    root = root or os.getpid()
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        after = text.rsplit(")", 1)[-1].split()  # fields after the command name (which may hold spaces)
        pid, ppid = int(stat.parent.name), int(after[1])
        if pid == root or ppid == root:
            total += int(after[11]) + int(after[12])
    return total


class ThreadGovernor:
    """Sets torch's thread count to the cores other processes leave free (``setting`` "auto"), or to a fixed count.

    ``update()`` after each optimizer step; returns a message when the count changed (for the run's log)."""

    def __init__(self, setting: str | int | None = "auto", *, check_every: int = 25, cores: int | None = None):
        self.cores = cores or os.cpu_count() or 1
        self.check_every = max(1, int(check_every))
        self.steps = 0
        self.fixed: int | None = None
        text = str(setting if setting is not None else "auto").strip().lower()
        if text != "auto":
            try:
                self.fixed = int(text)
            except ValueError:
                raise ValueError(f"train.threads must be 'auto' or a positive number of threads, got {setting!r}") from None
            if self.fixed < 1:
                raise ValueError(f"train.threads must be 'auto' or a positive number of threads, got {setting!r}")
        elif os.environ.get("OMP_NUM_THREADS", "").strip():
            self.fixed = torch.get_num_threads()  # the user's OMP_NUM_THREADS, as torch read it
        self.enabled = self.fixed is None and machine_busy_ticks() is not None
        self._mark()

    def _mark(self) -> None:
        self._wall, self._busy, self._own = time.monotonic(), machine_busy_ticks(), process_tree_ticks() if self.enabled else 0

    def start(self, probe_seconds: float = 0.3) -> str:
        """Set the first count: a fixed one, or from a short look at the machine's load."""
        if self.fixed is not None:
            torch.set_num_threads(self.fixed)
            return f"threads: {self.fixed} (fixed)"
        if not self.enabled:
            return f"threads: {torch.get_num_threads()} (torch's default; no /proc/stat to watch the load)"
        self._mark()
        time.sleep(probe_seconds)
        count, other = self.choose()
        torch.set_num_threads(count)
        return f"threads: {count} (auto: {other:.1f} of {self.cores} cores busy with other work)"

    def other_load(self) -> float:
        """Cores' worth of CPU time used by other processes since the last look."""
        wall, busy, own = time.monotonic(), machine_busy_ticks(), process_tree_ticks()
        seconds = max(wall - self._wall, 1e-3)
        other = ((busy - self._busy) - (own - self._own)) / CLOCK_TICKS / seconds
        self._wall, self._busy, self._own = wall, busy, own
        return max(0.0, other)

    def choose(self) -> tuple[int, float]:
        other = self.other_load()
        # a core counts as taken when another process used more than ~40 % of one
        return max(1, min(self.cores, self.cores - int(other + 0.6))), other

    def update(self) -> str | None:
        if not self.enabled:
            return None
        self.steps += 1
        if self.steps % self.check_every:
            return None
        count, other = self.choose()
        if count == torch.get_num_threads():
            return None
        torch.set_num_threads(count)
        return f"threads: {count} ({other:.1f} of {self.cores} cores busy with other work)"
