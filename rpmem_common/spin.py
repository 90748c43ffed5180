"""Bounded, adaptive busy-waiting for the next bytes of a lane, on both ends of it.

A thread that sleeps in ``recv`` while its answer is on the way pays for being woken up, and
when the answer comes from another CPU that went idle meanwhile, for waking that CPU first: on
a VM a halted virtual CPU takes 20-30 us to wake, more than a small persist's whole round trip.
So a lane that expects bytes soon (the client its answer, the agent the next request) polls its
socket with ``poll`` for up to a window before it blocks in the kernel. Between polls it calls
``sched_yield``, which hands the CPU to any other thread ready to run on it; when one did run
(the yield took long), the CPU is shared, with the peer or with other work, and polling stops:
the peer then runs while this thread sleeps, as without polling, and nothing is taken from
other work. ``poll`` also reports the end of the stream, a reset and a local shutdown (a lane
aborted from another thread): the wait ends at once, and the receive that follows fails as it
would have.

A large message is received the same way while it arrives: the receiver takes what has come
and polls for the rest (:meth:`Spinner.more`), where sleeping until the next segment would
cost a wake-up per segment, and at the end the time until its answer goes out. That polling
lasts as long as segments keep coming within the window, a whole transfer on a link that
delivers them so; a window of 0 turns it off with the rest.

Polling adapts: after :data:`MISSES` waits in a row where it saved nothing (the bytes came
later than the window, or never; another thread wanted the CPU; or they were there at once),
it is skipped for 1, 2, 4 ... up to :data:`MAX_SKIP` waits, then tried again; one wait that
polling ends brings it back. So a workload where it cannot help (answers that take longer than
the window, a client that thinks between operations, client and agent on one CPU) pays for it
now and then only, and an idle lane costs nothing: it blocks in the kernel as before.
"""

from __future__ import annotations

import os
import select
import time

#: default window in microseconds (``PMREPLICA_SPIN_US``): about what a sleeping receiver's
#: wake-up costs on a VM, so that spinning in vain costs at most twice what it can save
DEFAULT_WINDOW_US = 50
#: the largest window a client may ask for, and an agent grants
MAX_WINDOW_US = 10_000
#: waits in a row that polling must miss before it is skipped
MISSES = 3
#: the most waits skipped between two tries
MAX_SKIP = 256

#: a sched_yield that takes longer ran another thread (one that returns at once takes ~1 us)
_RAN = 3000  # ns
_POLLIN = select.POLLIN
_clock = time.perf_counter_ns
_yield = os.sched_yield


class Spinner:
    """Polls one socket for readable bytes before its owner blocks on it.

    ``pending``, for a TLS lane, is OpenSSL's count of bytes it decrypted and holds (they are
    no longer on the socket)."""

    __slots__ = ("_poll", "_pending", "window", "misses", "skip")

    def __init__(self, fd: int, window_us: int, pending=None) -> None:
        poller = select.poll()
        poller.register(fd, _POLLIN)
        self._poll = poller.poll
        self._pending = pending
        self.window = window_us * 1000  # ns; 0 never polls
        self.misses = 0
        self.skip = 0

    def ready(self) -> bool:
        """Bytes can be read now, or the stream ended (one poll, no wait)."""
        return bool(self._pending is not None and self._pending() or self._poll(0))

    def wait(self) -> None:
        """Return once bytes can be read (or the stream ended) or polling gave up; the caller
        then receives, blocking if nothing came."""
        if self.skip:
            self.skip -= 1
            return
        if not self.window or self._pending is not None and self._pending():
            return
        poll = self._poll
        if not poll(0):
            end = _clock() + self.window
            while True:
                before = _clock()
                if before > end:
                    break
                _yield()
                if _clock() - before > _RAN:
                    break  # another thread ran on this CPU meanwhile: the peer, or other work
                if poll(0):
                    self.misses = 0  # polling found the bytes: a sleep and wake-up saved
                    return
        # bytes there at once (a receive would not have slept), or polling gave up
        self.misses = misses = self.misses + 1
        if misses >= MISSES:
            self.skip = min(MAX_SKIP, 1 << min(misses - MISSES, 16))

    def more(self) -> bool:
        """Poll for the next bytes of a message that is arriving (its sender sends it whole,
        waiting for nothing): True once they can be read, False when the window passed without
        any or another thread wanted this CPU; the caller then blocks. No adapting here: the
        bytes are known to be on their way, and a CPU shared with the sender ends the polling
        at the first yield."""
        if not self.window:
            return False
        poll = self._poll
        end = _clock() + self.window
        while True:
            before = _clock()
            if before > end:
                return False
            _yield()
            if _clock() - before > _RAN:
                return False
            if poll(0):
                return True
