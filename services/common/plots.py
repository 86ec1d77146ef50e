"""matplotlib for figures written to files (reports, loss curves): the Agg backend, no screen needed."""

from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no screen on servers
    import matplotlib.pyplot as plt

    return plt
