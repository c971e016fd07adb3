"""The background half of ``rawpatch.RawSink``: large tensors written by a thread.

A full rewrite computes a tensor (read, transform: numpy, GIL released) and writes it
(read back the old bytes, XOR, CRC-32, ``pwrite``: GIL released too) one after the other
on one core. Here the writing runs in a thread, one tensor behind the computing, so a
second core does it. Small tensors are written inline (a hand-over costs more than them),
and so are tensors larger than ``PENDING``: at most ``PENDING`` bytes wait or are being
written, so the peak memory grows by at most that (plus the thread's 4 MB scratch buffer).
"""
from __future__ import annotations

import threading
from collections import deque

import numpy as np

BEHIND_MIN = 1 << 20  # tensors smaller than this are written inline
PENDING = 1 << 23  # bytes handed over and not yet written


class Behind:
    def __init__(self, sink):
        self.sink = sink
        self._cv = threading.Condition()
        self._queue = deque()
        self._pending = 0
        self._done = []  # CRC changes finished, not yet handed back
        self._error = None
        self._stopping = False
        self._old = None
        self._thread = None  # started by the first tensor handed over (none before a fork)

    def put(self, data, regs):
        """Write ``data`` at ``regs`` (inline when small); the CRC changes finished so far."""
        self._check()
        if not BEHIND_MIN <= data.nbytes <= PENDING:
            out = self.sink.put_bytes(data, regs, self.sink._scratch)
        else:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="surgeon-raw-writer", daemon=True)
                self._thread.start()
            with self._cv:
                while self._pending + data.nbytes > PENDING and self._error is None:
                    self._cv.wait()
                self._queue.append((data, regs))
                self._pending += data.nbytes
                self._cv.notify_all()
            out = []
        self._check()
        with self._cv:
            out, self._done = out + self._done, []
        return out

    def finish(self):
        """Wait until every handed-over tensor is written; their CRC changes."""
        with self._cv:
            while self._pending and self._error is None:
                self._cv.wait()
            out, self._done = self._done, []
        self._check()
        return out

    def stop(self):
        with self._cv:
            self._stopping = True
            self._queue.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _check(self):
        if self._error is not None:
            raise self._error

    def _scratch(self, n):
        if self._old is None or self._old.size < n:
            self._old = np.empty(n, np.uint8)
        return self._old[:n]

    def _loop(self):
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                data, regs = self._queue[0]
            try:
                out = self.sink.put_bytes(data, regs, self._scratch)
            except BaseException as exc:  # raised in the caller's thread by put/finish
                with self._cv:
                    self._error = exc
                    self._queue.clear()
                    self._pending = 0
                    self._cv.notify_all()
                return
            with self._cv:
                self._queue.popleft()
                self._pending -= data.nbytes
                self._done.extend(out)
                self._cv.notify_all()
            del data, regs  # (not kept alive while waiting for the next tensor)
