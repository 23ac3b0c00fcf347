"""structlog configuration (done once, by the application), progress bars and durations as a
person reads them.

Library modules only call `structlog.get_logger()`. Ranks other than 0 log warnings and errors
only, and never draw progress bars. Bars show elapsed time and ETA as `clock` writes them: H:MM:SS
under a day, days and hours past it (`6 d 07 h`, not tqdm's `150:32:37`), years past one.
"""

from __future__ import annotations

import logging
import math
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


DAY, YEAR = 86400.0, 365.25 * 86400.0


def clock(seconds: float) -> str:
    """A duration for a progress bar: `05:48`, `3:05:48`, `6 d 07 h` past a day, `17.2 years`
    past a year ('?' when unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds >= YEAR:
        return f"{seconds / YEAR:.1f} years"
    if seconds >= DAY:
        days, rest = divmod(int(seconds), int(DAY))
        return f"{days} d {rest // 3600:02d} h"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def in_words(seconds: float) -> str:
    """A duration in words, rounded as a person would say it: "about 40 s", "about 12 minutes",
    "about 3.5 h", "about 9 days", "about 17 years"."""
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} minutes"
    if seconds < 2 * DAY:
        hours = seconds / 3600
        return f"about {hours:.1f} h" if hours < 10 else f"about {round(hours)} h"
    if seconds < 2 * YEAR:
        days = seconds / DAY
        return f"about {days:.1f} days" if days < 10 else f"about {round(days)} days"
    return f"about {round(seconds / YEAR)} years"


class Bar(tqdm):
    """tqdm with durations as `clock` writes them. `eta_s`, when set (a callable giving
    seconds or None), replaces tqdm's own estimate: the trainer's knows that evaluations
    lie ahead, which a rate of steps does not."""

    eta_s = None

    @property
    def format_dict(self):
        d = super().format_dict
        remaining = None
        if self.eta_s is not None:
            remaining = self.eta_s()
        elif d["total"] and d["n"] > d["initial"]:
            rate = d["rate"] or (d["n"] - d["initial"]) / max(d["elapsed"], 1e-9)
            remaining = (d["total"] - d["n"]) / rate if rate else None
        return {**d, "elapsed_h": clock(d["elapsed"]), "eta_h": clock(remaining) if remaining is not None else "?"}


BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed_h}<{eta_h}, {rate_fmt}{postfix}]"


def progress(total: int | None, desc: str, *, rank: int | None = None, unit: str = "it", initial: int = 0) -> Bar:
    """A bar with rate and ETA on rank 0; a silent stand-in elsewhere (plugins may call this
    without knowing their rank: it is read from the launcher's RANK)."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    return Bar(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        disable=rank != 0,
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=0.5,
        leave=True,
        # Without a total there is no ETA to show: tqdm's own format then.
        bar_format=BAR_FORMAT if total else None,
    )
