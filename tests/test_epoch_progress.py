"""training.resume.EpochProgress: a checkpoint taken mid-epoch continues the epoch exactly (batches, RNG, sums)."""
import torch

from training.resume import EpochProgress


class DrawingLoader:
    """Like a loader whose augmentation draws from the global RNG when its iterator starts."""

    def __iter__(self):
        start = torch.rand(1)
        return iter([(start + i, torch.tensor([i % 2, 1])) for i in range(6)])


def run_steps(progress, batches, n):
    """n steps: each takes a batch, adds to the sums and draws from the RNG like dropout would."""
    seen = []
    for _ in range(n):
        images, labels = next(batches)
        logits = torch.stack([images.repeat(2), -images.repeat(2)], 1)
        progress.add(images.sum(), logits, labels)
        seen.append((images.item(), torch.rand(1).item()))
    return seen


def test_a_mid_epoch_state_continues_the_epoch_exactly():
    torch.manual_seed(0)
    whole = EpochProgress()
    batches = whole.batches(DrawingLoader(), torch.device("cpu"))
    run_steps(whole, batches, 2)
    state = whole.state_dict()
    rest = run_steps(whole, batches, 4)

    torch.manual_seed(123)  # another process, another RNG state
    resumed = EpochProgress()
    resumed.load_state_dict(state)
    batches = resumed.batches(DrawingLoader(), torch.device("cpu"))
    assert resumed.step == 2 and resumed.first == 2
    assert run_steps(resumed, batches, 4) == rest  # the same batches, and the RNG continues where it stopped
    assert (resumed.loss_sum.item(), resumed.correct.item(), resumed.seen) == \
        (whole.loss_sum.item(), whole.correct.item(), whole.seen)


def test_an_epoch_boundary_keeps_no_epoch_state():
    progress = EpochProgress()
    batches = progress.batches(DrawingLoader(), torch.device("cpu"))
    run_steps(progress, batches, 6)
    progress.next_epoch()
    state = progress.state_dict()
    assert state["step_in_epoch"] == 0 and state["epoch_rng"] is None and state["sums"] is None
