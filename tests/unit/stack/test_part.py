"""Stopping a part stops everything it started: a child that left the part's session (as Ray's daemons do)
is found through psutil's process tree, not lost when its parent goes."""

from __future__ import annotations

import sys
import time

import psutil
import pytest

from services.stack.part import Part
from services.stack.stack import stop_all

# A parent that starts a child in a session of its own, prints the child's pid, then waits forever.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def started(tmp_path, detached: bool) -> tuple[Part, psutil.Process]:
    log = tmp_path / f"parent-{detached}.log"
    part = Part("parent", [sys.executable, "-c", PARENT], 0, health="port", log=log, detached=detached).spawn()
    deadline = time.monotonic() + 20
    while not log.read_text().strip():
        assert time.monotonic() < deadline, "the parent never started its child"
        time.sleep(0.05)
    child = psutil.Process(int(log.read_text().split()[0]))
    assert child.is_running() and child.ppid() == part.pid  # the fault is in place before the stop
    return part, child


@pytest.mark.parametrize("detached", [False, True])
@pytest.mark.parametrize("how", ["stop", "kill", "stop_all"])
def test_stopping_a_part_stops_a_child_that_left_its_session(tmp_path, detached, how):
    part, child = started(tmp_path, detached)
    try:
        {"stop": lambda: part.stop(grace=5), "kill": part.kill, "stop_all": lambda: stop_all([part], 5)}[how]()
        assert not part.running()
        gone, _ = psutil.wait_procs([child], timeout=10)
        assert gone, f"the child {child.pid} outlived its part ({how})"
    finally:
        if child.is_running():
            child.kill()
