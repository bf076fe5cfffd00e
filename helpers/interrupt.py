"""Ctrl-C and SIGTERM while training: the main process raises them where it is safe, and they never
kill DataLoader workers first, so train.py saves last.pt before it exits (130 or 143).

    with stop_signals():            # train.py's main()
        for batch in held(loader):  # raised between batches, never while one is fetched
            ...

Both signals often reach the whole process group: Ctrl-C in a terminal, SIGTERM from `kill` of
the group, a scheduler's time limit or `docker stop`.
- A worker forked while stop_signals() is on starts with both blocked and keeps them so: it cannot
  die of one before the main process has saved, not even in its first instant (a dead worker
  surfaces in the main process as a RuntimeError, not as Terminated).
- While the main process fetches a batch (receiving a worker's tensors is a handshake with that
  worker), a signal waits until the batch is in: raised mid-handshake, it would leave the worker a
  connection reset by its peer, and a traceback on stderr.
"""

import os
import signal
from contextlib import contextmanager

_state = {"holding": False, "pending": None, "mask": None}


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's time limit, `docker stop`), handled like Ctrl-C."""


def _stop(signum, frame=None):
    if _state["holding"]:
        _state["pending"] = signum  # raised by _holding once the fetch is done
        return
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


@contextmanager
def stop_signals():
    """Ctrl-C raises KeyboardInterrupt and SIGTERM raises Terminated, as held() allows."""
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _block_before_fork():
    if signal.getsignal(signal.SIGTERM) is _stop:
        _state["mask"] = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _unblock_in_parent():
    # The child keeps the mask it was forked with: both signals blocked for its whole life.
    if _state["mask"] is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, _state["mask"])
        _state["mask"] = None


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(before=_block_before_fork, after_in_parent=_unblock_in_parent)


def held(iterable):
    """Yield the items of `iterable` (a DataLoader); Ctrl-C and SIGTERM raise between items, never
    while one is fetched (or the workers are started)."""
    it = _holding(iter, iterable)
    while True:
        try:
            item = _holding(next, it)
        except StopIteration:
            return
        yield item


def _holding(fn, arg):
    _state["holding"] = True
    try:
        return fn(arg)
    finally:
        _state["holding"] = False
        signum, _state["pending"] = _state["pending"], None
        if signum is not None:
            _stop(signum)


def ignore_sigterm(worker_id):
    """worker_init_fn for workers started without a fork (the spawn start method: macOS), which
    start with no signal blocked: from here on a SIGTERM to the process group cannot kill them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
