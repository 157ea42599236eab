"""torchrun's elastic restarts: a worker group that torchrun restarts (`--max-restarts N`, after any worker of
any node died) continues the run from its last checkpoint by itself, with no --resume.

A restart must find the run it continues, so its name has to outlive the processes: --name, or under torchrun
the rendezvous id (`--rdzv-id`, or the one `--standalone` draws), which every restart of the job keeps. The
decision is taken together: torchrun counts a restart only on the nodes whose workers failed (a node restarted
because another one rejoined keeps its count), so every rank resumes if any rank was restarted. Resuming reads
the run folder on every rank, so a multi-node job keeps --runs-dir on storage all nodes see.
"""
import os
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
