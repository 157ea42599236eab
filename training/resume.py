"""Stopping a run cleanly and continuing it exactly: the RNG states, the clean-stop flag (Ctrl-C, SIGTERM),
and `EpochProgress`, all an exact resume needs of the epoch beyond the weights and the optimizer."""
import random
import signal
import threading

import numpy as np
import torch

PER_PROCESS = ("rng", "epoch_rng", "sums")  # the keys of EpochProgress.state_dict a checkpoint keeps per rank


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG a step may draw from, in plain types so checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}  # this process's GPU only


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class EpochProgress:
    """Where the run is inside its epoch, with the epoch's running sums; what an exact resume needs of it.

    The loader's order follows (seed, epoch), but its augmentation may draw from our RNG when the iterator
    starts. So a checkpoint keeps a pair of RNG states: the epoch's start and the moment it stopped. A resumed
    epoch restarts from the first, replays the batches already trained on (`step` of them), then takes the
    second; the sums (loss, correct, samples) continue, so the epoch's record covers all of it."""

    def __init__(self):
        self.step = 0  # batches of this epoch trained on
        self.start_rng = None  # the RNG state this epoch started from
        self.stop_rng = None  # from a checkpoint: the RNG state to continue from, after the replay
        self.sums = None  # from a checkpoint: (loss, correct, samples) so far
        self.loss_sum = self.correct = None  # on the device: no sync per step
        self.seen = self.first = self.seen_before = 0

    def batches(self, loader, device):
        """This epoch's batch iterator, past the batches already trained on, and the sums so far."""
        if self.stop_rng is not None:
            set_rng_state(self.start_rng if self.step else self.stop_rng)
        if not self.step:
            self.start_rng = rng_state()
        batches = iter(loader)
        for _ in range(self.step):
            next(batches)
        if self.stop_rng is not None:
            set_rng_state(self.stop_rng)
            self.stop_rng = None
        loss, correct, self.seen = self.sums or (0.0, 0, 0)
        self.loss_sum = torch.full((), loss, dtype=torch.float32, device=device)
        self.correct = torch.full((), correct, dtype=torch.int64, device=device)
        self.first, self.seen_before, self.sums = self.step, self.seen, None
        return batches

    def add(self, loss, logits, labels):
        """One step's loss (detached) and predictions into the sums, on the device."""
        self.loss_sum += loss
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += len(labels)
        self.step += 1

    def next_epoch(self):
        self.step, self.start_rng, self.loss_sum, self.correct = 0, None, None, None

    def state_dict(self):
        """This process's part of a checkpoint; mid-epoch the sums are read (a sync, at checkpoints only)."""
        mid_epoch = self.step > 0
        return {"step_in_epoch": self.step, "rng": rng_state(), "epoch_rng": self.start_rng if mid_epoch else None,
                "sums": (self.loss_sum.item(), int(self.correct.item()), self.seen) if mid_epoch else None}

    def load_state_dict(self, state):
        self.step, self.stop_rng = state["step_in_epoch"], state["rng"]
        self.start_rng, self.sums = state["epoch_rng"], state["sums"]


class StopFlag:
    """Ctrl-C / SIGTERM ask for a clean stop at the next step; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal, self._previous = None, {}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self):
        if threading_is_main():  # Python lets only the main thread install handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def threading_is_main():
    return threading.current_thread() is threading.main_thread()
