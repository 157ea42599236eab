"""Beyond one node, on one machine, gloo on the CPU (docs/multinode.md):

1. Two torchrun "nodes" (`--nnodes 2`, c10d rendezvous on 127.0.0.1) train one run: identical weights on both
   ranks, the per-step losses of a one-node `--nproc-per-node 2` run with the same global batch, and only global
   rank 0 writes (each node runs in its own folder with a relative --runs-dir: one of them stays empty).
2. Elastic restarts: under `torchrun --max-restarts 1`, rank 1 killed with -9 mid-epoch is restarted by torchrun
   and the run continues from its last checkpoint by itself, to the uninterrupted run's losses and weights.
3. A node that never comes back: `python -m training.launch` ends in one line naming it, the rendezvous timeout
   and the --resume that continues the run.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import train
from report.runlog import read_metrics
from tests.test_train_ddp import DDP_OPTIONS

REPO = Path(train.__file__).resolve().parent
LOSS_BOUND = 1e-6  # two nodes vs one: the same sums in the same order on one machine, so in practice 0


def launch(launcher, script, *args, cwd, module="torch.distributed.run"):
    """Start `python -m MODULE LAUNCHER script args` (torchrun, or training.launch) in `cwd`, in a session of its
    own so that `stop` ends its workers too, with its temporary files in `cwd` (a launch killed with -9 leaves
    them); the caller ends it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(cwd), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get(
        "PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-m", module, *launcher, str(script), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop(child):
    """End a launch and every worker it started (kill -9 of its session)."""
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()


def finished(child, timeout=600):
    """(stdout, stderr) of a launch that must succeed; it is killed if it overstays."""
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        raise AssertionError(f"the launch overstayed {timeout} s: {child.communicate()[1][-3000:]}") from None
    finally:
        stop(child)
    assert child.returncode == 0, err[-3000:]
    return out, err


def step_losses(run_dir):
    return [s["loss"] for s in read_metrics(run_dir)[0]]


def weights(prefix, rank):
    return torch.load(f"{prefix}{rank}.pt", weights_only=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_one_run_like_one_node_with_two_processes(two_process_run, ingested, tmp_path):
    one_dir, one_prefix, script = two_process_run
    steps_per_epoch = len(step_losses(one_dir)) // 2
    max_steps = steps_per_epoch + 2  # into the second epoch: its shuffle and an end-of-epoch checkpoint seen
    port, nodes = free_port(), [tmp_path / f"node{i}" for i in (0, 1)]
    children = []
    try:
        for i, node in enumerate(nodes):
            node.mkdir()
            children.append(launch(["--nnodes", "2", "--node-rank", str(i), "--nproc-per-node", "1", "--rdzv-backend",
                                    "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"],
                                   script, tmp_path / "two-rank", *DDP_OPTIONS, "--data", ingested, "--runs-dir",
                                   "runs", "--name", "two", "--max-steps", max_steps, cwd=node))
        for child in children:
            finished(child)
    finally:
        for child in children:
            stop(child)

    rank0, rank1 = weights(tmp_path / "two-rank", 0), weights(tmp_path / "two-rank", 1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the nodes' weights differ"
    written = [node for node in nodes if (node / "runs").exists()]
    assert len(written) == 1 and sorted(p.name for p in (written[0] / "runs").iterdir()) == ["two"], \
        "only global rank 0 writes the run folder"
    config = json.loads((written[0] / "runs" / "two" / "config.json").read_text())
    assert config["world"] == 2 and config["process_group"] == "gloo"
    two, one = step_losses(written[0] / "runs" / "two"), step_losses(one_dir)[:max_steps]
    assert len(two) == max_steps
    assert max(abs(a - b) for a, b in zip(two, one)) <= LOSS_BOUND, (two, one)


def rank_process(launcher, rank, timeout=120):
    """The worker process of `rank` that torchrun `launcher` started (found by its environment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} process appeared in {timeout} s")


def kill_rank(launcher, rank, launchers):
    """SIGKILL the worker of `rank` that `launcher` runs now (found at the kill: one found earlier may have been
    restarted since). A worker that ended by itself fails the test with what every launch said."""
    try:
        rank_process(launcher, rank).send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        for child in launchers:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
        said = "\n".join(child.communicate()[1][-3000:] for child in launchers)
        raise AssertionError(f"rank {rank}'s worker ended by itself before the kill:\n{said}") from None


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_is_restarted_by_torchrun_and_resumes_exactly(two_process_run, ingested, tmp_path):
    one_dir, one_prefix, script = two_process_run
    steps_per_epoch = len(step_losses(one_dir)) // 2
    child = launch(["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"], script, tmp_path / "elastic-rank",
                   *DDP_OPTIONS, "--data", ingested, "--runs-dir", tmp_path, "--name", "elastic", cwd=tmp_path)
    try:
        metrics = tmp_path / "elastic" / "metrics.jsonl"
        while child.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >
                                            steps_per_epoch + 2):  # one epoch record, then into the second epoch
            time.sleep(0.02)
        assert child.poll() is None, f"the run ended before a rank was killed: {child.communicate()[1][-3000:]}"
        kill_rank(child, 1, [child])
        _, err = finished(child)
    finally:
        stop(child)

    assert "torchrun restart 1: continuing" in err, err[-3000:]
    assert step_losses(tmp_path / "elastic") == step_losses(one_dir)
    for rank in (0, 1):
        a, b = weights(one_prefix, rank), weights(tmp_path / "elastic-rank", rank)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_nodes_restarted_apart_meet_again_and_resume_exactly(two_process_run, ingested, tmp_path):
    """Node 1's worker killed with -9 mid-epoch: torchrun counts a restart on node 1 only, so the nodes' restart
    counts differ; launched through training.launch (a fresh store per round) they meet again and the run ends
    with the uninterrupted run's losses and weights (with the counts as store prefix it never took a step)."""
    one_dir, one_prefix, script = two_process_run
    steps_per_epoch = len(step_losses(one_dir)) // 2
    port, nodes, children = free_port(), [tmp_path / f"node{i}" for i in (0, 1)], []
    metrics = tmp_path / "runs" / "apart" / "metrics.jsonl"  # a resume reads the run on every rank: shared storage
    try:
        for i, node in enumerate(nodes):
            node.mkdir()
            children.append(launch(["--nnodes", "2", "--node-rank", str(i), "--nproc-per-node", "1", "--rdzv-backend",
                                    "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "apart",
                                    "--max-restarts", "1"], script, tmp_path / "apart-rank", *DDP_OPTIONS, "--data",
                                   ingested, "--runs-dir", tmp_path / "runs", "--name", "apart", cwd=node,
                                   module="training.launch"))
            if i == 0:
                time.sleep(1)  # node 0 hosts the rendezvous store, as the endpoint's node does on real nodes
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) > steps_per_epoch + 2):
            assert all(c.poll() is None for c in children) and time.monotonic() < deadline, \
                [c.communicate()[1][-3000:] for c in children if c.poll() is not None]
            time.sleep(0.02)
        kill_rank(children[1], 1, children)
        errs = [finished(child)[1] for child in children]
    finally:
        for child in children:
            stop(child)

    assert "torchrun restart 1: continuing" in errs[0], errs[0][-3000:]
    assert step_losses(metrics.parent) == step_losses(one_dir)
    for rank in (0, 1):
        a, b = weights(one_prefix, rank), weights(tmp_path / "apart-rank", rank)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_several_nodes_that_may_restart_need_a_fresh_store_per_round(monkeypatch):
    """torch's shared store with restart-count prefixes cannot bring nodes restarted apart together again: such a
    run is refused in one line naming torch's switch, which training.launch sets (training/device.py)."""
    from cli import UsageError
    from training.device import SHARED_STORE_SWITCH, restart_store
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    with pytest.raises(UsageError, match=f"needs {SHARED_STORE_SWITCH}=1 .* python -m training.launch"):
        restart_store()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what the agents say once the switch is set
    assert restart_store() == {}


@pytest.mark.slow
def test_a_node_that_never_comes_back_ends_the_launch_in_one_line(ingested, tmp_path):
    """python -m training.launch (torchrun, one-line ends): node 1 (agent and worker) killed with -9 after the
    first checkpoint; node 0's worker says in one line that it lost its peer, torchrun restarts it, the
    rendezvous waits join_timeout (5 s here) for node 1, and the launch ends with one line naming the lost node,
    the timeout and the --resume that continues the run, exit 2, no traceback."""
    port, nodes, children = free_port(), [tmp_path / f"node{i}" for i in (0, 1)], []
    checkpoint = nodes[0] / "runs" / "lost" / "last.pt"
    try:
        for i, node in enumerate(nodes):
            node.mkdir()
            children.append(launch(["--nnodes", "2", "--node-rank", str(i), "--nproc-per-node", "1", "--rdzv-backend",
                                    "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lost",
                                    "--max-restarts", "1", "--rdzv-conf", "join_timeout=5"],
                                   REPO / "train.py", *DDP_OPTIONS, "--data", ingested, "--runs-dir",
                                   "runs", "--name", "lost", cwd=node, module="training.launch"))
            if i == 0:
                time.sleep(1)  # node 0 hosts the rendezvous store, as the endpoint's node does on real nodes
        deadline = time.monotonic() + 300
        while not checkpoint.exists():
            assert all(c.poll() is None for c in children) and time.monotonic() < deadline, \
                [c.communicate()[1][-3000:] for c in children if c.poll() is not None]
            time.sleep(0.05)
        node1 = psutil.Process(children[1].pid)
        for process in [node1, *node1.children(recursive=True)]:  # its worker runs in a session of its own
            process.send_signal(signal.SIGKILL)
        _, err = children[0].communicate(timeout=300)
    finally:
        for child in children:
            stop(child)
    last = err.strip().splitlines()[-1]
    assert children[0].returncode == 2 and "Traceback" not in err, err[-3000:]
    assert last.startswith("error: the node at 127.0.0.1 never came back (lost by rank 0 at epoch ") and \
        last.endswith(f"): the rendezvous at 127.0.0.1:{port} waited its join_timeout of 5 s for 2 nodes (this one: "
                      f"{socket.gethostname()}); the run keeps its last checkpoint: when every node is up, relaunch "
                      "them all with --resume runs/lost added"), err[-3000:]
    assert "error: rank 0 of 2 on" in err and "lost its peer at 127.0.0.1" in err, err[-3000:]


def test_a_restart_finds_its_run_by_the_rendezvous_id_and_max_restarts_needs_a_name(monkeypatch):
    """What lets a restarted group find its run (training/elastic.py), without launching one."""
    from dataclasses import replace

    from cli import UsageError
    from training.elastic import run_name
    cfg = train.Config(net="resnet18", loader="resident")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert run_name(cfg) == "resnet18-resident-job7" and run_name(replace(cfg, name="mine")) == "mine"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    with pytest.raises(UsageError, match="--max-restarts needs a run name"):
        run_name(cfg)
