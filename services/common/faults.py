"""Named crash points of the write protocols, for tests: with IMSEARCH_CRASH_AT=<name> the process kills
itself with SIGKILL the moment it reaches that point — as a power cut or `kill -9` would, at a known place
instead of a random one. Unset (always, outside tests), a crash point costs one settings lookup. The points and
what each interrupts are listed with the setting (config.CRASH_POINTS), which refuses any other name at start."""

from __future__ import annotations

import os
import signal

from services.common.config import CRASH_POINTS, get_settings


def crash_point(name: str) -> None:
    """Die here when the test switch names this point."""
    if name not in CRASH_POINTS:
        raise ValueError(f"unknown crash point {name!r}")
    if get_settings().crash_at == name:
        os.kill(os.getpid(), signal.SIGKILL)
