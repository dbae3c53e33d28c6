"""Graceful shutdown: turn SIGINT/SIGTERM into a flag the training loop polls.

    with GracefulShutdown() as stop:
        for batch in batches:
            state, metrics = train_step(state, batch)
            if stop.requested:
                checkpointer.save(step, state, ..., force=True)
                break

A second signal of the same kind while one is pending gets the previous
handler's behaviour (SIGINT: KeyboardInterrupt; SIGTERM: termination), so a stuck
save can still be interrupted. Handlers can only be installed from the main thread.
"""
from __future__ import annotations

import os
import signal
import threading


class GracefulShutdown:
    """Context manager that turns SIGINT/SIGTERM into a flag (`requested`) the
    training loop polls, so it can checkpoint and stop between steps."""
    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.requested = False
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == self.received:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)   # SIGINT's default handler raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self.requested, self.received = True, signum

    def __enter__(self) -> "GracefulShutdown":
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("GracefulShutdown must be entered from the main thread; "
                             f"this is {threading.current_thread().name!r}")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
