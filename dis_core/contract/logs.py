"""structlog configuration (done once, by the application) and progress bars.

Library modules only call `structlog.get_logger()`. Ranks other than 0 log warnings and errors
only, and never draw progress bars.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog
from tqdm.auto import tqdm

_configured = False


def configure(rank: int = 0, json: bool = False) -> None:
    global _configured
    level = logging.INFO if rank == 0 else logging.WARNING
    processors = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="%H:%M:%S"),
    ]
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Look sys.stderr up at each use rather than binding today's object: a caller (a test
        # harness, a notebook) may swap it later.
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # DeepSpeed logs through `logging`; keep its chatter out of the user's way.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _configured = True


def progress(total: int | None, desc: str, *, rank: int | None = None, unit: str = "it", initial: int = 0):
    """A bar with rate and ETA on rank 0; a silent stand-in elsewhere (plugins may call this
    without knowing their rank: it is read from the launcher's RANK)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        disable=rank != 0,
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=0.5,
        leave=True,
    )
