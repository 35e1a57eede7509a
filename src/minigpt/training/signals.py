"""Stopping a training run by signal: the first Ctrl-C (or SIGTERM, what `kill` and job schedulers
send before they SIGKILL) asks the loop to finish its step, save and stop; a second one stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def stop_on_signal(request_stop: Callable[[], None], announce: bool = True) -> Iterator[None]:
    """While inside, SIGINT/SIGTERM call `request_stop()` once; a second signal raises
    KeyboardInterrupt. Signals can only be caught on the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    signals = 0  # this process's own; under torchrun other ranks stop by agreement, unsignalled

    def handler(signum, frame):
        nonlocal signals
        signals += 1
        if signals > 1:
            raise KeyboardInterrupt
        request_stop()
        if announce:
            name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{name}: finishing this step and saving a checkpoint (Ctrl-C again to abort)",
                  file=sys.stderr)

    stopping = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, handler) for sig in stopping}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
