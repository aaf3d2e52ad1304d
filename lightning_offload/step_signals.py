"""Ctrl+C and a cluster's requeue signal take effect between training steps, for engines that update parameters
during backward: stopped (or checkpointed) inside such a step, a model is half a step ahead of its step counter."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

Handler = Callable[[int, FrameType | None], Any]


class SignalsHeldInSteps:
    """Replaces the handlers of `signals` (those with a Python handler) with ones that, inside a step, hold the signal
    and run its handler when the step ends. A second Ctrl+C inside the same step stops at once."""

    def __init__(self, signals: Iterable[int], why: str) -> None:
        self._why = why
        self._handlers: dict[int, Handler] = {}
        self._held: list[int] = []
        self._in_step = False
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; there, Python runs none either
        for signum in dict.fromkeys(signals):
            handler = signal.getsignal(signum)
            if callable(handler):
                self._handlers[signum] = handler
                signal.signal(signum, self._receive)

    def step_started(self) -> None:
        self._in_step = True

    def step_ended(self) -> None:
        """Leaves the step, then runs the handlers of the signals held in it (Ctrl+C's raises `KeyboardInterrupt`)."""
        self._in_step = False
        held, self._held = self._held, []
        for signum in held:
            self._handlers[signum](signum, None)

    def remove(self) -> None:
        """Puts back each handler this replaced, unless something else has replaced it since."""
        for signum, handler in self._handlers.items():
            if signal.getsignal(signum) == self._receive:
                signal.signal(signum, handler)
        self._handlers, self._held = {}, []

    def _receive(self, signum: int, frame: FrameType | None) -> None:
        if not self._in_step:
            self._handlers[signum](signum, frame)
        elif signum == signal.SIGINT and signum in self._held:
            self._held.remove(signum)
            self._handlers[signum](signum, frame)
        elif signum not in self._held:
            self._held.append(signum)
            action = ("Press Ctrl+C again to stop now, inside the step" if signum == signal.SIGINT else
                      "Its handler runs then")
            print(f"{signal.Signals(signum).name} received inside a training step: it takes effect when the step ends, "
                  f"{self._why}. {action}.", file=sys.stderr, flush=True)
