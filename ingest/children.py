"""No silent hang when a child process dies: FFCV's beton writer waits for a count, and then on a queue, that
a child killed by kill -9 or the OOM killer never fills, at 0 % CPU, holding `--out`'s lock.

`watch_children` watches the process's children from a thread while a stage runs; when one was killed by a
signal, it interrupts the main thread with ChildDied (one line: which child, which signal, what to do). The
children are found in /proc and their status read without reaping them (waitid WNOWAIT), so the pools that
own them still see what they expect."""
import contextlib
import multiprocessing
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from cli import UsageError


class ChildDied(UsageError):
    """A child process of a stage was killed; the message is the one line to show."""


def said(what, pid, how):
    """The one line for a child `pid` that ended `how` (a signal number, or a phrase)."""
    if isinstance(how, int):
        how = f"was killed by {signal.Signals(how).name}" if how in signal.valid_signals() else f"got signal {how}"
    return (f"{what} stopped: its child process {pid} {how} (the OOM killer sends SIGKILL when memory runs out); "
            "what was written is kept: rerun to finish (fewer --workers use less memory)")


def _children():
    pids = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids.update(int(pid) for pid in f.read().split())
        except OSError:
            pass
    return pids


def _death(pid):
    """How child `pid` died (its killing signal, or 'exited with code N'; not reaped: it stays waitable for its
    owner), or None while it runs or after it exited cleanly."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None:
        return None
    if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        return info.si_status
    return f"exited with code {info.si_status}" if info.si_status else None


@contextlib.contextmanager
def watch_children(what, every=0.5):
    """Raise ChildDied in the block within about `every` seconds of a child it started dying (by a signal, or
    exiting with an error). Only the main
    thread can be interrupted so; elsewhere (a test calling from a thread) the block runs unwatched."""
    if threading.current_thread() is not threading.main_thread() or not os.path.isdir("/proc/self/task"):
        yield
        return
    death, stop, main = [], threading.Event(), threading.main_thread().ident

    def interrupt(signum, frame):
        raise ChildDied(death[0])

    before = _children()  # another stage's or the caller's: not this block's to judge

    def watch():
        while not stop.wait(every):
            for pid in _children() - before:
                how = _death(pid)
                if how is not None:
                    death.append(said(what, pid, how))
                    signal.pthread_kill(main, signal.SIGUSR2)  # wakes a blocked read or sleep, unlike a flag
                    return

    previous = signal.signal(signal.SIGUSR2, interrupt)
    watcher = threading.Thread(target=watch, name="watch_children", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGUSR2, previous)


@contextlib.contextmanager
def process_pool(workers, what):
    """A stage's pool of `workers` spawned processes (spawn, not fork: the caller may hold threads, torch's or
    DALI's, that a forked child would inherit broken), watched by watch_children: a worker's death is ChildDied,
    one line. On any exception the stage's workers are ended before the pool waits for them: CPython 3.11's
    pool, broken by a death while it still starts workers one per task, can wait forever for a worker it
    started after it broke (seen: the ingest hung in the pool's shutdown after its first worker was killed)."""
    others = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        with watch_children(what):
            yield pool
    except BaseException as err:
        for worker in set(multiprocessing.active_children()) - others:
            worker.terminate()
        # the pool noticed the death first: BrokenProcessPool, or, while it was still starting workers, a
        # ValueError or an OSError ("handle is closed", seen once in a whole-suite run) from spawning with the
        # pipes it had just closed. Only the private _broken tells those from others: the public probe, submit,
        # raises BrokenProcessPool on a broken pool but starts a worker on one that is not, which is what must not
        # happen here; without it (another CPython) they stay a traceback, never a hang.
        if isinstance(err, BrokenProcessPool) or (isinstance(err, (ValueError, OSError))
                                                  and getattr(pool, "_broken", False)):
            raise ChildDied(said(what, "(a worker)", "died")) from None
        raise
    finally:
        pool.shutdown(cancel_futures=True)
