"""Preemption: SIGTERM or SIGUSR1 ends a run with a complete checkpoint instead of losing everything since the last.

Schedulers announce the end of a job with a signal and a grace period: SIGTERM (preemption, ``scancel``, the
wall-time limit) or the signal chosen with SLURM's ``--signal=USR1@<seconds>``. A rank that receives one only
notes it; the training loop asks every rank at the next step boundary (the one small all-reduce per step in
``dist.max_over_ranks``), so a signal that reaches only some ranks still stops all of them at the same step.
They save one complete checkpoint and exit with ``PREEMPTED_EXIT_CODE``; starting the same command again resumes
from it exactly.

A watcher thread sees every signal as it arrives (``signal.set_wakeup_fd``), even while the main thread waits in
a collective or on a file, and ends this process at once (``os._exit``) when

- a second signal comes more than ``REPEAT_WINDOW_S`` after the first (copies within that window are one
  preemption: launchers forward the signal that the whole process group received already), or
- ``runner.preempt_timeout`` seconds have passed since the first signal without the checkpoint being complete.

It then exits with 128 + the signal's number, as if the signal had killed it; a checkpoint being written at that
moment never becomes ``latest`` (``checkpoint.py`` moves ``latest`` only after every rank's files are complete).
"""
from __future__ import annotations

import os
import select
import signal
import threading
import time
from typing import Dict, Optional

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry" (the run resumes when restarted)
PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REPEAT_WINDOW_S = 5.0


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _say(text: str) -> None:
    """Write to stderr without locks: safe from a signal handler and from the watcher thread."""
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


class PreemptionWatch:
    """Notes SIGTERM / SIGUSR1 for the training loop; ends the process at once on a second signal or when the
    grace period runs out. ``signal_number`` is the first signal received here (0: none)."""

    def __init__(self, grace_s: float, rank: int = 0):
        self.grace_s = grace_s
        self.rank = rank
        self.signal_number = 0
        self.saved = False  # the final checkpoint is complete: a forced exit now still reports preemption
        self._first_at: Optional[float] = None
        self._lock = threading.RLock()  # the main-thread handler may interrupt itself
        self._previous: Dict[int, object] = {}
        self._previous_wakeup_fd = -1
        self._pipe: Optional[tuple] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ install / remove

    def start(self) -> "PreemptionWatch":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        self._pipe = (read_end, write_end)
        self._previous_wakeup_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for number in PREEMPTION_SIGNALS:
            self._previous[number] = signal.signal(number, self._handler)
        self._thread = threading.Thread(target=self._watch, name="zvl-preemption-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Restore the previous handlers (tests; a training process simply exits)."""
        if self._pipe is None:
            return
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        read_end, write_end = self._pipe
        self._pipe = None
        os.close(write_end)  # the watcher reads end-of-file and returns
        if self._thread is not None:
            self._thread.join(timeout=5)
        os.close(read_end)

    # ------------------------------------------------------------------ signals

    def _handler(self, number, frame) -> None:
        # Runs in the main thread whenever it gets to it; the watcher thread has usually seen the signal first.
        self._note_first(number)

    def _note_first(self, number: int) -> bool:
        with self._lock:
            if self.signal_number:
                return False
            self.signal_number = number
            self._first_at = time.monotonic()
        _say(f"[rank {self.rank}] {signal_name(number)} received: finishing the current step, then saving a "
             f"checkpoint (a second signal, or runner.preempt_timeout={self.grace_s:g} s, ends the job at once "
             "without one)\n")
        return True

    def _watch(self) -> None:
        read_end = self._pipe[0]
        while True:
            first_at = self._first_at
            wait = None if first_at is None else max(0.0, first_at + self.grace_s - time.monotonic())
            ready, _, _ = select.select([read_end], [], [], wait)
            if not ready:
                self._end_now(f"runner.preempt_timeout={self.grace_s:g} s passed since "
                              f"{signal_name(self.signal_number)}")
            try:
                data = os.read(read_end, 64)
            except OSError:
                return
            if not data:
                return
            for number in data:
                if number in PREEMPTION_SIGNALS and not self._note_first(number):
                    if time.monotonic() - (self._first_at or 0.0) > REPEAT_WINDOW_S:
                        self._end_now(f"a second signal ({signal_name(number)})")

    def _end_now(self, why: str) -> None:
        if self.saved:
            _say(f"[rank {self.rank}] {why}: the preemption checkpoint is already complete; exiting\n")
            os._exit(PREEMPTED_EXIT_CODE)
        _say(f"error: [rank {self.rank}] {why}: ending at once without a new checkpoint; `latest` still names "
             "the last complete one\n")
        os._exit(128 + (self.signal_number or signal.SIGTERM))


def ignore_preemption_signals() -> None:
    """In a DataLoader worker: the scheduler signals every process of the job, the workers included, and a worker
    killed by it would fail the step that the rank is finishing. The rank ends its workers itself."""
    for number in PREEMPTION_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    try:
        signal.set_wakeup_fd(-1)  # the forked copy of the rank's pipe must not report the worker's signals
    except ValueError:
        pass
