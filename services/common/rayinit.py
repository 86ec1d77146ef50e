"""Joining the Ray cluster (or starting a private instance): one place for the embedder's and the indexer's
Ray engines."""

from __future__ import annotations

import logging

from services.common.config import Settings
from services.common.errors import Unavailable


def start_ray(settings: Settings) -> None:
    """Connect to the cluster, or start a private instance."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws one bar for either engine
    ctx.execution_options.preserve_order = True  # embedding parts are cut at chunk boundaries, in catalogue order
    # Ray's notices (token authentication, "started a local instance", "progress bars disabled") are not
    # this run's business; its errors still print.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    if not ray.is_initialized():
        # Settings travel as stage arguments, so no IMSEARCH_* secrets go into Ray's runtime env.
        # No address: a private instance ("local"), never whatever `ray start` left running on this host.
        try:
            ray.init(address=settings.ray_address or "local", include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
        except ConnectionError as e:  # unreachable, or refused (a cluster with token auth needs RAY_AUTH_TOKEN)
            cause = str(e.__cause__ or e).splitlines()[0]
            raise Unavailable(f"cannot reach the Ray cluster at {settings.ray_address}: {cause}") from None
