import pytest
import torch

from cli import Parser, UsageError
from loaders import make_loader
from loaders.common import IMAGENET_MEAN, IMAGENET_STD, Normalizer, rank_ids, resolve_device


@pytest.mark.parametrize("n,world", [(0, 1), (1, 2), (10, 3), (101, 4)])
def test_rank_ids_partition_without_padding(n, world):
    blocks = [list(rank_ids(n, r, world)) for r in range(world)]
    assert sorted(i for b in blocks for i in b) == list(range(n))


def test_unknown_loader_lists_choices():
    with pytest.raises(UsageError, match="dali, ffcv, torch, folder, resident"):
        make_loader("nope", "x", "train", batch_size=4)


def test_cuda_without_gpu_is_a_usage_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UsageError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_normalizer_matches_the_formula_in_any_input_layout(layout, dtype):
    images = torch.randint(0, 256, (5, 3, 7, 9)).to(dtype).contiguous(memory_format=layout)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = Normalizer("cpu")(images)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, (images.float() - mean) / std)


def test_normalizer_reuses_its_ring_of_buffers_on_the_cpu():
    normalize = Normalizer("cpu", ring=2)
    full = torch.zeros(4, 3, 5, 5, dtype=torch.uint8)
    first, second, third = normalize(full), normalize(full), normalize(full[:3])
    assert first.data_ptr() != second.data_ptr()  # the batch just handed over is never the one being written
    assert third.data_ptr() == first.data_ptr() and len(third) == 3  # a partial batch: a view of a buffer
    assert normalize(torch.zeros(4, 3, 6, 6, dtype=torch.uint8)).shape == (4, 3, 6, 6)  # new size, new buffers


def test_help_shows_each_default_once():
    parser = Parser(prog="x")
    parser.add_argument("--size", type=int, default=7, help="a size")
    parser.add_argument("--out", default=None, help="a folder (default results/<time>)")
    text = " ".join(parser.format_help().split())
    assert "a size (default: 7)" in text
    assert "a folder (default results/<time>)" in text and "(default: None)" not in text


def test_normalizer_ring_never_hands_a_short_buffer_a_full_batch():
    """Issue 19 item 3: full, short, full, short, ... (a split of two batches, epoch after epoch)."""
    normalize = Normalizer("cpu", ring=3)
    full = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    for _ in range(4):
        for images in (full, full[:3]):
            out = normalize(images)
            assert out.shape == images.shape
            torch.testing.assert_close(out, Normalizer("cpu")(images.clone()))
