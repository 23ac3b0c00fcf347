"""Stopping a training run on a signal, at the end of a step and after a checkpoint of it.

SIGINT (Ctrl-C) and SIGTERM (what schedulers and `timeout` send before SIGKILL) only ask the
loop to stop after the step under way; the trainer then writes a checkpoint and raises
`Interrupted`, and the CLI says how to resume. A second signal stops at once, without one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

import torch

from dis_core.loop import engine as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training was stopped by a signal: `checkpoint` holds step `step`, or is None when a second
    signal stopped it at once. A KeyboardInterrupt, so that whatever handles Ctrl-C handles it."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at step {step}")


class StopSignals:
    """The signal received while training, if any (`listening`), agreed on by every rank (`requested`)."""

    def __init__(self, *, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.received: int | None = None

    @contextlib.contextmanager
    def listening(self, step: Callable[[], int]) -> Iterator[None]:
        """Within the block SIGINT and SIGTERM are recorded, not acted on; a second one raises
        `Interrupted` at the step `step()`. The handlers in place before come back after."""
        self.received = None
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread may install handlers: signals keep their usual effect
            return
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

        def handler(signum, frame):
            if self.received is not None:
                raise Interrupted(signum, step(), None)
            self.received = signum
            if self.rank == 0:
                # os.write, not print: the interrupted code may be inside a write to sys.stderr.
                with contextlib.suppress(OSError):
                    os.write(2, f"\n{signal.Signals(signum).name}: stopping at the end of this step, after writing "
                                f"a checkpoint (send it again to stop at once, without one)\n".encode())

        for s in STOP_SIGNALS:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)  # None: set outside Python

    def requested(self) -> int | None:
        """The signal asking training to stop, if any. With several processes a collective: a
        signal may reach one rank a step before another, and all must stop at the same step."""
        if self.world == 1:
            return self.received
        got = dist.all_reduce_sum(torch.tensor([1.0 if self.received else 0.0], device=self.device)).item()
        return (self.received or signal.SIGTERM) if got else None
