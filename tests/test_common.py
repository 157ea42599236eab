import pytest

from cli import UsageError
from loaders import make_loader
from loaders.common import rank_ids, resolve_device


@pytest.mark.parametrize("n,world", [(0, 1), (1, 2), (10, 3), (101, 4)])
def test_rank_ids_partition_without_padding(n, world):
    blocks = [list(rank_ids(n, r, world)) for r in range(world)]
    assert sorted(i for b in blocks for i in b) == list(range(n))


def test_unknown_loader_lists_choices():
    with pytest.raises(UsageError, match="dali, ffcv, torch, folder, resident"):
        make_loader("nope", "x", "train", batch_size=4)


def test_cuda_without_gpu_is_a_usage_error():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UsageError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
