"""What every loader backend promises (loaders.common), checked on each: the batch format, each sample once
per epoch with its own label, an order fixed by (seed, epoch) that changes between epochs, ranks that
partition a split, and one-line errors for bad input.

Add a backend by adding its name to BACKENDS; one whose module is not written yet is skipped. Samples are
identified by the backends' `with_ids=True` output, which each backend reads from its own storage (DALI:
the tar member name; FFCV: the record index; torch/folder: their sample table), so a shuffled or dropped
sample shows rather than being inferred. Each loader configuration is built once per module and shared by
the tests, with workers=1: an FFCV loader spends seconds compiling with numba on its first epoch.
"""
import csv
import gc
import os
import shutil
from dataclasses import dataclass

import pytest
import torch

from cli import UsageError, run
from conftest import require, slow_backends
from ingest import layout
from loaders import make_loader
from loaders.common import rank_ids, resolve_workers

BACKENDS = ["dali", "ffcv", "torch", "folder", "resident"]
# A numba finalizer of FFCV prints a harmless KeyError when a process holds several Loaders (DEPENDENCIES.md).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")
RES, BATCH = 32, 16  # 65 train samples (the `ingested` fixture) -> 5 batches, the last one partial
RANK_TEST_PASSES = (0, 1, 2)  # the test split's passes on each of 2 ranks, read once for the tests of both


def csv_labels(data_dir, split):
    with open(layout.csv_path(data_dir, split), newline="") as f:
        return [int(row["label"]) for row in csv.DictReader(f)]


@dataclass
class Epoch:
    ids: list
    labels: list


class Runs:
    """Epochs of loaders built once per configuration; `instance` asks for a second, independent loader."""

    def __init__(self, data_dir):
        self.data_dir, self.cache, self.threads = data_dir, {}, {}

    def epochs(self, name, split, epochs=(0,), *, seed=0, rank=0, world=1, instance=0, break_first=False):
        """Ids and labels of each epoch in turn; break_first leaves a first pass after one batch."""
        key = (name, split, epochs, seed, rank, world, instance, break_first)
        if key not in self.cache:
            threads = torch.get_num_threads()
            require(name)
            loader = make_loader(name, self.data_dir, split, batch_size=BATCH, res=RES, device="cpu", seed=seed,
                                 rank=rank, world=world, workers=1, with_ids=True)
            if break_first:
                next(iter(loader))
            self.cache[key] = [self._epoch(loader, epoch) for epoch in epochs]
            self.threads[key] = (threads, torch.get_num_threads())
        return self.cache[key]

    @staticmethod
    def _epoch(loader, epoch):
        """One epoch's ids and labels, checking every batch against the format of loaders.common."""
        loader.set_epoch(epoch)
        ids, labels, sizes = [], [], []
        for images, batch_labels, batch_ids in loader:
            n = len(batch_ids)
            assert images.shape == (n, 3, RES, RES) and images.dtype == torch.float32
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert batch_labels.shape == (n,) and batch_labels.dtype == torch.int64
            assert batch_ids.dtype == torch.int64
            assert -3 < images.mean() < 3 and images.std() > 0.1  # normalised, not 0-255 nor blank
            ids += batch_ids.tolist()
            labels += batch_labels.tolist()
            sizes.append(n)
        assert len(sizes) == len(loader) and len(ids) == loader.num_samples
        assert all(s == BATCH for s in sizes[:-1]) and 0 < sizes[-1] <= BATCH  # only the last one partial
        return Epoch(ids, labels)


@pytest.fixture(scope="module")
def runs(ingested):
    yield Runs(ingested)
    gc.collect()  # FFCV's finalizers run here, under this module's warning filter, not in someone else's test


@pytest.mark.parametrize("name", slow_backends(BACKENDS))
def test_train_epoch_gives_each_sample_once_with_its_label(name, runs, ingested):
    truth = csv_labels(ingested, "train")
    for epoch in runs.epochs(name, "train", (0, 1, 0), break_first=True):  # an abandoned pass changes nothing
        assert sorted(epoch.ids) == list(range(len(truth)))
        assert epoch.labels == [truth[i] for i in epoch.ids]


@pytest.mark.parametrize("name", slow_backends(BACKENDS))
def test_train_order_changes_each_epoch_and_follows_seed_and_epoch(name, runs):
    first, second, first_again = runs.epochs(name, "train", (0, 1, 0), break_first=True)
    assert first.ids != second.ids
    assert first_again.ids == first.ids  # epoch 0 after epoch 1: the order does not depend on history
    (resumed,) = runs.epochs(name, "train", (1,), instance=1)
    assert resumed.ids == second.ids  # a fresh loader with the same seed, started at epoch 1 (a resume)
    (other_seed,) = runs.epochs(name, "train", (0,), seed=1)
    assert other_seed.ids not in (first.ids, second.ids)  # seed + epoch would make it equal the second


@pytest.mark.parametrize("name", slow_backends(BACKENDS))
def test_test_split_every_pass_in_id_order_even_after_one_left_early(name, runs, ingested):
    truth = csv_labels(ingested, "test")
    for epoch in runs.epochs(name, "test", (0, 1, 1), break_first=True):
        assert epoch.ids == list(range(len(truth))) and epoch.labels == truth


@pytest.mark.parametrize("name", slow_backends(BACKENDS))
def test_loader_leaves_torch_thread_count_alone(name, runs):
    """The model's CPU work needs its threads: FFCV, for one, resets torch's count on import and per epoch."""
    runs.epochs(name, "train", (0, 1, 0), break_first=True)
    before, after = next(v for k, v in runs.threads.items() if k[:3] == (name, "train", (0, 1, 0)))
    assert after == before


@pytest.mark.parametrize("name", slow_backends(BACKENDS))
@pytest.mark.parametrize("split", ["train", "test"])
def test_two_ranks_partition_the_split(name, split, runs, ingested):
    count = len(csv_labels(ingested, split))
    passes = RANK_TEST_PASSES if split == "test" else (0,)  # the test split: the loaders of the test below
    ranks = [runs.epochs(name, split, passes, rank=r, world=2)[0].ids for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(count))
    if split == "test":  # in id order, each rank a contiguous block, so metrics can be gathered by id
        assert ranks == [list(rank_ids(count, r, 2)) for r in range(2)]


@pytest.mark.parametrize("name", slow_backends(BACKENDS))
def test_two_ranks_keep_their_test_blocks_pass_after_pass(name, runs, ingested):
    """The id-order contract under DDP from the second evaluation on (DALI's reader moved each rank on to the
    next rank's shard at every reset)."""
    count = len(csv_labels(ingested, "test"))
    for rank in range(2):
        for epoch in runs.epochs(name, "test", RANK_TEST_PASSES, rank=rank, world=2):
            assert epoch.ids == list(rank_ids(count, rank, 2))


@pytest.mark.parametrize("name", slow_backends(BACKENDS))
def test_a_loader_tells_training_its_classes_and_steps_per_epoch(name, ingested):
    """Training takes the class names and the steps of an epoch from its loader: the full batches that every
    rank has, so ranks whose blocks differ by a sample still step together."""
    require(name)
    manifest, options = layout.read_manifest(ingested), {"cache": False} if name == "resident" else {}
    count = manifest["splits"]["train"]["count"]
    ranks = [make_loader(name, ingested, "train", batch_size=BATCH, res=RES, device="cpu", rank=r, world=2,
                         workers=1, **options) for r in range(2)]
    assert [loader.num_samples for loader in ranks] == [count // 2, count - count // 2]  # 32 and 33
    assert [loader.classes for loader in ranks] == [manifest["classes"]] * 2
    assert [loader.steps_per_epoch for loader in ranks] == [count // 2 // BATCH] * 2


@pytest.mark.parametrize("name", slow_backends(BACKENDS))
@pytest.mark.parametrize("split", ["train", "test"])
def test_a_split_of_two_batches_with_a_short_last_one_runs_epoch_after_epoch(name, split, ingested):
    """Issue 19 item 3: the Normalizer's ring of reused buffers once kept a buffer sized for the short last
    batch and handed it a full one an epoch later (a size-mismatch crash in the third epoch)."""
    require(name)
    count = layout.read_manifest(ingested)["splits"][split]["count"]
    batch = count * 2 // 3  # two batches, the second one short
    options = {"cache": False} if name == "resident" else {}
    loader = make_loader(name, ingested, split, batch_size=batch, res=RES, device="cpu", workers=1, **options)
    for epoch in range(4):
        loader.set_epoch(epoch)
        assert [len(labels) for _, labels in loader] == [batch, count - batch]


def test_workers_default_to_this_process_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_workers(None) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two DDP ranks on this machine (torchrun sets it)
    assert resolve_workers(None) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert resolve_workers(None) == 1
    assert resolve_workers(0) == 0 and resolve_workers(3) == 3


@pytest.mark.parametrize("name", slow_backends(BACKENDS))
def test_negative_workers_are_one_line(name, ingested):
    require(name)
    with pytest.raises(UsageError, match="^--workers must be >= 0 \\(0: load in the training process\\), not -1$"):
        make_loader(name, ingested, "test", batch_size=4, workers=-1)


@pytest.mark.parametrize("name", slow_backends(BACKENDS))
def test_not_ingested_folder_is_one_line_pointing_at_ingest(name, tmp_path, capsys):
    require(name)
    with pytest.raises(SystemExit) as exit_:
        run(lambda argv: make_loader(name, tmp_path, "train", batch_size=4))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python ingest/build.py" in err


@pytest.mark.parametrize("name", slow_backends(["dali", "ffcv", "torch"]))  # the backends that read the ingested binaries
def test_missing_shards_are_a_usage_error(name, tmp_path, ingested):
    require(name)
    for kept in (layout.MANIFEST, "train.csv", "test.csv"):
        shutil.copy(ingested / kept, tmp_path / kept)
    with pytest.raises(UsageError, match="ingest/build.py"):
        make_loader(name, tmp_path, "train", batch_size=4)


@pytest.mark.parametrize("name", slow_backends(BACKENDS))
def test_cuda_asked_without_gpu_is_a_usage_error(name, ingested):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    require(name)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        make_loader(name, ingested, "test", batch_size=4, device="cuda")


@pytest.mark.parametrize("name", slow_backends(BACKENDS))
def test_gpu_batches_stay_on_the_gpu(name, ingested):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    require(name)
    images, labels = next(iter(make_loader(name, ingested, "train", batch_size=4, res=RES, device="cuda")))
    assert images.is_cuda and labels.is_cuda and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dali", [False, True])
def test_workers_fork_after_a_garbage_collection_only_where_dali_is_loaded(dali, monkeypatch):
    """The collection keeps a DALI pipeline's garbage from being finalized in a forked worker (the hang of issue
    19); without DALI in the process there is none to keep, and a collection cost 0.3-1 s at every worker start."""
    import sys
    import types
    from loaders.common import WorkerLoader
    if dali:
        monkeypatch.setitem(sys.modules, "nvidia.dali", types.ModuleType("nvidia.dali"))
    else:
        monkeypatch.delitem(sys.modules, "nvidia.dali", raising=False)
    collections, forks = [], []
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(args) or 0)
    class NoWorkers:  # an iterator of no batches, with the index queues a real one's workers read
        _index_queues = ()

        def __iter__(self):
            return self

        def __next__(self):
            raise StopIteration

    # where DataLoader would fork its workers: in order after the collection, not run (a fork costs seconds)
    monkeypatch.setattr(torch.utils.data.DataLoader, "_get_iterator", lambda self: forks.append(collections[:]) or
                        NoWorkers())
    assert list(WorkerLoader(range(4), batch_size=2, num_workers=1)) == []
    assert forks == [[()] if dali else []]


@pytest.mark.slow
def test_workers_of_a_loader_left_in_a_reference_cycle_end_at_once(monkeypatch):
    """A DataLoader iterator with workers freed by the cycle collector (a run's loaders, an exception's
    traceback) ended each worker only after DataLoader's 5 s join timeout: the collector closed its index
    queues (their finalizers are weak references) before the iterator's __del__ could send the workers' stop.
    Seen: 10.4 s for 2 workers in one garbage collection."""
    import time
    from torch.utils.data._utils import MP_STATUS_CHECK_INTERVAL  # DataLoader's join timeout: 5 s per worker
    from loaders.common import WorkerLoader
    gc.collect()  # earlier tests' garbage (DALI pipelines, FFCV threads) is not this loader's to pay for
    loader = WorkerLoader(range(8), batch_size=2, num_workers=2, persistent_workers=True)
    batches = iter(loader)
    next(batches)
    workers = list(batches._workers)
    cycle = [loader, batches]
    cycle.append(cycle)
    del loader, batches, cycle
    start = time.monotonic()
    gc.collect()
    assert time.monotonic() - start < 0.8 * MP_STATUS_CHECK_INTERVAL and not any(w.is_alive() for w in workers)
