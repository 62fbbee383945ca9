"""Stop requests: SIGTERM / SIGUSR1 / Ctrl-C (and the time limit) ask the loop to finish its step, save and exit."""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass


@dataclass
class StopRequest:
    """Set by a signal handler; read (agreed over ranks) once per step by the loop."""

    signal_name: str | None = None  # or another reason to stop (the time limit)
    first_at: float = 0.0  # time.monotonic() of the first signal

    @property
    def requested(self) -> str | None:
        return self.signal_name

    def request(self, reason: str | None) -> None:
        """Ask to stop for `reason` (None: don't), as a signal would (the time limit); a signal that came first keeps its name."""
        if reason and self.signal_name is None:
            self.signal_name, self.first_at = reason, time.monotonic()


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")  # schedulers and cloud notebooks send TERM/USR1 before a kill
# A launcher relays the signal it got to its workers, who got it from the terminal too: torchrun sends the same
# SIGINT within milliseconds, DeepSpeed's launcher a SIGTERM. Within this window a second signal is that echo.
RELAYED_SIGNAL_WINDOW_S = 1.0


@contextlib.contextmanager
def catch_stop_signals(stop: StopRequest):
    """While inside, SIGTERM / SIGUSR1 / Ctrl-C ask the loop to finish its step, save and exit. A second
    Ctrl-C, later than a launcher's relay of the first, interrupts at once."""

    def handler(signum, frame):
        if stop.signal_name is None:
            stop.signal_name, stop.first_at = signal.Signals(signum).name, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - stop.first_at > RELAYED_SIGNAL_WINDOW_S:
            raise KeyboardInterrupt

    previous = {}
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            previous[name] = signal.signal(getattr(signal, name), handler)
    try:
        yield stop
    finally:
        for name, old in previous.items():
            signal.signal(getattr(signal, name), old)
