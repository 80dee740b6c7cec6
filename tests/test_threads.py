"""train.threads: the thread governor that keeps a run from collapsing when another process shares the cores."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from composer.train import threads
from composer.train.threads import ThreadGovernor


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_fixed_count_is_set_and_bad_values_are_refused():
    governor = ThreadGovernor(1)
    assert "fixed" in governor.start() and torch.get_num_threads() == 1
    assert governor.update() is None  # a fixed count is never changed
    for bad in ("many", 0, -2):
        with pytest.raises(ValueError, match="train.threads"):
            ThreadGovernor(bad)


def test_omp_num_threads_in_the_environment_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    governor = ThreadGovernor("auto")
    assert governor.fixed == 1 and not governor.enabled


@pytest.mark.skipif(threads.machine_busy_ticks() is None, reason="needs /proc/stat (Linux)")
def test_auto_gives_up_the_cores_others_use(monkeypatch):
    governor = ThreadGovernor("auto", check_every=1, cores=4)
    loads = iter([0.1, 1.3, 2.9, 5.0, 0.0])
    monkeypatch.setattr(governor, "other_load", lambda: next(loads))
    counts = []
    for _ in range(5):
        governor.update()
        counts.append(torch.get_num_threads())
    # 0.1 cores busy elsewhere: all 4; 1.3: 3 (a core counts as taken above ~40 % of it); 2.9: 1; 5.0: never below 1
    assert counts == [4, 3, 1, 1, 4]


@pytest.mark.skipif(threads.machine_busy_ticks() is None, reason="needs /proc/stat (Linux)")
def test_a_child_process_counts_as_this_run_not_as_other_load():
    before = threads.process_tree_ticks()
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 0.6\nwhile time.time() < end: pass"])
    time.sleep(0.5)
    during = threads.process_tree_ticks()  # read while the child is alive (a finished child leaves the tree)
    child.wait()
    assert during - before >= 0.2 * threads.CLOCK_TICKS  # the busy child's time is counted as ours
