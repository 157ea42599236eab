"""`python -m training.launch`: torchrun itself (the same options, the same engine, torch.distributed.run), whose
end when a node never comes back is one line instead of its traceback.

When a node dies, the survivors' workers fail at their next collective (each says so in one line:
training.elastic.peer_lost), torchrun restarts them and waits at the rendezvous for the missing node for its
`join_timeout` (600 s by default; `--rdzv-conf join_timeout=S`). If the node never comes back, torchrun ends
with a RendezvousTimeoutError traceback; this launcher ends with the line that says which node was lost (the
address the survivors lost), the timeout it waited and how to resume the run, exit code 2. It also gives each
rendezvous round a fresh store (training.device.restart_store), which several nodes need to restart together.
"""
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from cli import UsageError, run
from training.device import SHARED_STORE_SWITCH
from training.elastic import LOST_NOTE

DEFAULT_JOIN_TIMEOUT = 600  # torch.distributed.elastic's c10d rendezvous


def main(argv=None):
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    notes = Path(tempfile.mkdtemp(prefix="fastpix-launch-"))
    os.environ[LOST_NOTE] = str(notes / "lost.jsonl")  # the workers inherit it
    os.environ.setdefault(SHARED_STORE_SWITCH, "1")  # nodes that restart apart meet again (device.restart_store)
    try:
        torchrun.run(args)
    except RendezvousTimeoutError:
        raise UsageError(lost_line(args, read_notes(notes / "lost.jsonl"))) from None
    finally:
        shutil.rmtree(notes, ignore_errors=True)
    return 0


def read_notes(path):
    """The workers' notes of a lost peer (training.elastic.peer_lost), oldest first."""
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def lost_line(args, notes):
    """The launch's last line: the node the survivors lost, the timeout waited, the --resume that continues."""
    conf = dict(kv.split("=", 1) for kv in (args.rdzv_conf or "").split(",") if "=" in kv)
    timeout = conf.get("join_timeout", DEFAULT_JOIN_TIMEOUT)
    peers = sorted({n["peer"] for n in notes if n.get("peer")})
    who = f"the node at {', '.join(peers)}" if peers else "a node"
    seen = f" (lost by rank {notes[0]['rank']} at epoch {notes[0]['epoch']})" if notes else ""
    run_dir = notes[0]["run_dir"] if notes else "runs/<name>"
    return (f"{who} never came back{seen}: the rendezvous at {args.rdzv_endpoint} waited its join_timeout of "
            f"{timeout} s for {args.nnodes} nodes (this one: {socket.gethostname()}); the run keeps its last "
            f"checkpoint: when every node is up, relaunch them all with --resume {run_dir} added")


if __name__ == "__main__":
    run(main)
