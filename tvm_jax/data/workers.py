"""Life of grain's data worker processes (``data.worker_count > 0``).

grain starts its data workers (``mp_prefetch``) with the ``spawn`` method and gives them no way to notice
that the training process died: after a ``kill -9`` they block on a full queue for a long time.
:class:`WorkerSide` is a base for the data sources: when one is unpickled inside a worker process
(grain sends each worker the pipeline by pickling), the worker

* ignores SIGINT (a Ctrl-C in the terminal reaches the whole process group; the training process
  handles it and stops its workers), and
* starts a daemon thread that ends the worker within ``PARENT_POLL_SECS`` of the parent's death
  (the parent's pid, recorded by ``multiprocessing``, stops being ``os.getppid()`` once the worker
  is re-parented).

Nothing happens in the main process (``multiprocessing.parent_process()`` is None there).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

PARENT_POLL_SECS = 0.5
_watching = False
_lock = threading.Lock()


def exit_with_parent() -> None:
    """In a child process: ignore SIGINT and exit once the parent is gone (idempotent)."""
    global _watching
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return
    with _lock:
        if _watching:
            return
        _watching = True
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: the watch below still works
        pass
    threading.Thread(target=_watch, args=(parent.pid,), name="exit-with-parent", daemon=True).start()


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECS)
    os._exit(1)


class WorkerSide:
    """Mixin for objects grain pickles into its worker processes: unpickling one there calls
    :func:`exit_with_parent`."""

    def __setstate__(self, state):
        exit_with_parent()
        self.__dict__.update(state)
