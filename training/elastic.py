"""torchrun's elastic restarts: a worker group that torchrun restarts (`--max-restarts N`, after any worker of
any node died) continues the run from its last checkpoint by itself, with no --resume.

A restart must find the run it continues, so its name has to outlive the processes: --name, or under torchrun
the rendezvous id (`--rdzv-id`, or the one `--standalone` draws), which every restart of the job keeps. The
decision is taken together: torchrun counts a restart only on the nodes whose workers failed (a node restarted
because another one rejoined keeps its count), so every rank resumes if any rank was restarted. Resuming reads
the run folder on every rank, so a multi-node job keeps --runs-dir on storage all nodes see.

A node that dies takes its ranks with it: the others fail at their next collective. `peer_lost` makes that
one line (which peer address was lost, what torchrun does next, how to resume), noted for training.launch,
whose last line, if the node never comes back, names it.
"""
import contextlib
import json
import os
import re
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

from cli import UsageError
from training.device import all_ranks
from training.runfolder import CHECKPOINT, config_from_resume


def run_name(cfg):
    """--name, else <net>-<loader>-<rendezvous id> under torchrun (the same for every rank and every restart),
    else <net>-<loader>-<time>."""
    if cfg.name:
        return cfg.name
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        return f"{cfg.net}-{cfg.loader}-{run_id}"
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        raise UsageError("torchrun --max-restarts needs a run name that a restart can find: pass --name, or "
                         "--rdzv-id to torchrun")
    return f"{cfg.net}-{cfg.loader}-{time.strftime('%Y%m%d-%H%M%S')}"


def continue_after_restart(cfg, rank, world, device):
    """`cfg`, or after a torchrun restart (on any rank) the config that resumes its run (named by run_name) from
    the last checkpoint. A run that died before its first checkpoint starts again from step 0 (new_run_dir)."""
    restarts = int(all_ranks(world, device, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), "max"))
    run_dir = Path(cfg.runs_dir) / cfg.name
    if restarts == 0 or cfg.resume or not (run_dir / CHECKPOINT).is_file():
        return cfg
    if rank == 0:
        print(f"torchrun restart {restarts}: continuing {run_dir} from its last checkpoint", file=sys.stderr,
              flush=True)
    return config_from_resume(replace(cfg, resume=str(run_dir)))


LOST_NOTE = "FASTPIX_LOST_NOTE"  # set by training.launch: the file a worker that lost a peer notes it in
PEER_GONE = re.compile(r"Connection (reset|closed) by peer|Socket Timeout|NCCL communicator was aborted|"
                       r"collective operation timeout", re.I)  # what gloo and NCCL say when another rank is gone


@contextlib.contextmanager
def peer_lost(rank, world, run_dir, epoch):
    """A collective that fails because another rank is gone (its process or its node: gloo and NCCL say
    "connection reset / closed by peer" or time out) ends this worker with one line, not a traceback."""
    try:
        yield
    except RuntimeError as err:  # gloo's, rethrown by DDP's backward hook, is a plain RuntimeError
        import torch.distributed as dist

        # a network error, or what gloo and NCCL say of a gone peer; not every DistError (an NCCL CUDA error or an
        # out-of-memory in a collective keeps its traceback)
        if world <= 1 or not (isinstance(err, dist.DistNetworkError) or PEER_GONE.search(str(err))):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        address = re.search(r"\[([^\]]+)\]:\d+", str(err))
        note = {"rank": rank, "host": socket.gethostname(), "peer": address[1] if address else None,
                "epoch": epoch(), "run_dir": str(run_dir)}
        if os.environ.get(LOST_NOTE):  # appended, not files.py's atomic replace: every worker adds its own line
            with contextlib.suppress(OSError), open(os.environ[LOST_NOTE], "a") as f:
                f.write(json.dumps(note) + "\n")
        lost = f"its peer at {note['peer']}" if note["peer"] else "a peer"
        raise UsageError(f"rank {rank} of {world} on {note['host']} lost {lost} in epoch {note['epoch']} "
                         f"({first[:160]}): torchrun restarts the group and waits at the rendezvous for every node "
                         f"(its join_timeout); if one never comes back, relaunch them all with --resume {run_dir} "
                         "added") from None
