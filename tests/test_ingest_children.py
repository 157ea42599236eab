"""A child's death stops the ingest within seconds, with one line, releasing --out (issue 19, item 12): kill -9
(what the OOM killer sends) of FFCV's beton-writer child or of a validation worker. Before: the parent
blocked on a pipe at 0 % CPU, holding the lock, forever. A rerun then finishes the job with the bytes of an
uninterrupted ingest."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY_STORE, require_beton
from ingest.build import build
from test_ingest_rebuild import REPO, SILENT, outputs, tiny_cfg

SLOW_BETON = ("import time, ingest.beton as b; get = b._Encoded.__getitem__; "
              "b._Encoded.__getitem__ = lambda self, i: (time.sleep(0.05), get(self, i))[1]; ")


def start(src, out, prelude=""):
    argv = ["--src", str(src), "--out", str(out), "--store-size", str(TINY_STORE), "--shard-size", "32", "--quiet"]
    code = f"{prelude}import cli, ingest.build as m; cli.run(m.main, {argv!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def children(pid):
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found += [int(p) for p in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return found


def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_child_when(proc, ready, is_target, limit=120):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        targets = [c for c in children(proc.pid) if is_target(cmdline(c))] if ready() else []
        if targets:
            os.kill(targets[0], signal.SIGKILL)
            return time.monotonic()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pytest.fail("the ingest ended before its child could be killed")


@pytest.mark.parametrize("child", ["validation worker", pytest.param("beton writer", marks=pytest.mark.slow)])
def test_a_killed_child_stops_the_ingest_with_one_line_and_a_rerun_finishes(tiny_src, ingested, tmp_path, child):
    out = tmp_path / "out"
    if child == "beton writer":
        require_beton(ingested)
        proc = start(tiny_src, out, SLOW_BETON)
        killed = kill_child_when(proc, lambda: any(p.name.startswith(".train.beton.tmp") for p in out.glob(".*")),
                                 lambda line: "-c" in line and "resource_tracker" not in line)
    else:
        proc = start(tiny_src, out)
        killed = kill_child_when(proc, lambda: True, lambda line: "multiprocessing.spawn" in line
                                 and "resource_tracker" not in line)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the ingest hung after its child was killed")
    took = time.monotonic() - killed
    assert proc.returncode == 2, err
    said = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]  # --quiet: FFCV's bar too
    assert len(said) == 1 and "error: " in said[0] and "stopped: its child process" in said[0], err
    assert took < 30, f"{took:.0f} s"  # seconds (the watchdog looks twice a second), on a busy shared machine
    build(tiny_cfg(tiny_src, out), **SILENT)  # the lock was released, and the rerun completes
    assert outputs(out) == outputs(ingested)


@pytest.mark.parametrize("error", [ValueError("bad value(s) in fds_to_keep"), OSError("handle is closed")])
def test_a_pool_broken_while_it_still_starts_workers_is_one_line(error):
    """What the validation worker above raised once in a whole-suite run: its pool, broken by the kill while it
    was still starting workers, failed to start the next with the pipes it had just closed (OSError, or
    ValueError), before the watcher's ChildDied. The pool's own flag (set before it closes them) makes it the
    one line."""
    from ingest.children import ChildDied, process_pool

    with pytest.raises(ChildDied, match="stopped: its child process"):
        with process_pool(1, "validation") as pool:
            pool._broken = "A child process terminated abruptly"  # what CPython's manager thread sets first
            raise error
