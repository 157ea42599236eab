"""Shared test data, generated once per session (per pytest-xdist worker) and kept tiny so the whole suite stays
fast on 2 cores.

`tiny_src`: a demo source folder (6 classes x 12 photos, long side 120-300 px, plus the demo's junk; which
file is which junk is in `tiny_src / ".demo.json"`). `ingested`: that folder ingested at store size 64.
Treat both as read-only; a test that changes data copies it first.

FFCV and DALI are not everywhere (the lent GPU machine has neither): `require` and `require_beton` let a
test that needs one skip with the reason instead of failing.
"""
import gc
import importlib
import os

# numba compiles FFCV's pipelines (every new Loader, in every process) without LLVM's optimisation passes here and
# in the processes tests start: on the tiny data the compiled loops run for milliseconds, the passes took a
# fifth of an FFCV test process's CPU (3 rounds of 4 loaders each: 20-29 s -> 16-21 s). Set before numba loads.
os.environ.setdefault("NUMBA_OPT", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from ingest.build import build  # noqa: E402
from ingest.config import IngestConfig  # noqa: E402
from ingest.demo import DemoConfig, generate  # noqa: E402

TINY_CLASSES = ("Abstract", "Celebrities", "Food", "Landscapes", "People", "Travel")
TINY_DEMO = DemoConfig(per_class=12, seed=0, long_side=(120, 300), classes=TINY_CLASSES)
TINY_STORE = 64


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("tiny-src")
    generate(src, TINY_DEMO, workers=2, progress=False)
    return src


@pytest.fixture(scope="session")
def ingested(tiny_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-ingested")
    build(IngestConfig(src=tiny_src, out=out, store_size=TINY_STORE, shard_size=32, workers=2),
          progress=False, log=lambda *_: None)
    return out


def has_beton(data_dir):
    """Whether the dataset holds .beton files: ingest writes them only where FFCV can be imported."""
    from ingest import layout
    return "ffcv" in layout.read_manifest(data_dir)["formats"]


def require_beton(data_dir):
    if not has_beton(data_dir):
        pytest.skip("the dataset has no .beton: FFCV cannot be imported here, so ingest wrote none")


def import_error(module):
    """None if `module` imports here, else why not."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        return str(err)
    return None


def slow_backends(cases):
    """`cases` for parametrize, those of the ffcv and dali backends marked slow: every new FFCV Loader compiles its
    pipeline with numba (5-20 s here, DEPENDENCIES.md) and every DALI pipeline builds and starts its threads
    (about a second on shared cores), which over the loader tests' grids would outlast the fast tier. DALI keeps
    its fast tests in test_loaders_dali.py and test_loaders_agreement.py. A case is a name or a tuple starting
    with one."""
    def streaming(case):
        return (case[0] if isinstance(case, tuple) else case) in ("ffcv", "dali")
    return [pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow) if streaming(c) else c
            for c in cases]


def require(backend):
    """Skip the test when the backend's module (or a library it needs) cannot be imported here."""
    import loaders
    module = loaders.BACKENDS[backend]
    error = import_error(module)
    if error:
        pytest.skip(f"{module} cannot be imported: {error}")


def pytest_collection_finish(session):
    """Leave what the test modules imported out of every later garbage collection (gc.freeze): torch, DALI, FFCV
    and matplotlib are half a million objects, which each full collection walked, 0.3-1 s a time here. A full
    collection runs before every DataLoader forks its workers (loaders.common.WorkerLoader), after each DALI test
    (below) and before each damage-matrix cell: hundreds in a session. What a test makes is still collected."""
    gc.collect()
    gc.freeze()


# Files whose tests share a session fixture: two_process_run, a torchrun of 2 processes, is made once for both.
SHARED_WORKER = {"tests/test_multinode.py": "tests/test_train_ddp.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist (setup.cfg's -n) hands out whole test files (--dist loadfile), so a module's fixtures (the
    damage matrix's worlds, a module's shared runs) are made once; files in SHARED_WORKER go to one worker.
    (xdist's own loadgroup cannot do this: with pytest 9 it leaves every test in a group of its own.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid):
            file = super()._split_scope(nodeid)
            return SHARED_WORKER.get(file, file)

    return FileScheduling(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """At the end of each test module, once its module fixtures are gone, freeze what is left (see
    pytest_collection_finish): what later modules imported (train, the report's matplotlib, predict's exporters)
    no longer adds 0.3 s to every collection. Only session fixtures (paths) and imports outlive a module."""
    yield
    if nextitem is None or nextitem.module is not item.module:
        gc.collect()
        gc.freeze()


@pytest.fixture(autouse=True)
def free_dali_pipelines(request):
    """After a test of DALI, collect its pipelines now: one sits in a reference cycle, and its threads run on
    until the garbage collector frees it. A DataLoader worker forked beside them can hang for good (seen: the
    torch loader's first worker, right after a dali test, in a session with no FFCV test between them)."""
    yield
    if "dali" in request.node.name:
        gc.collect()


@pytest.fixture(scope="module")
def small_flat_head():
    """flat with a small head, in this process and the processes it starts, for a test module that trains or
    builds flat without examining it (tests/small_heads.py says why and what stays the same). Module-scoped so
    that a module's shared worlds and runs are made with it too."""
    from small_heads import small_heads
    with small_heads("flat"):
        yield


@pytest.fixture
def one_thread():
    """One torch thread: on 2 shared cores, with loader workers beside it, more threads are slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def two_process_run(ingested, tmp_path_factory):
    """One DDP run under torchrun, one node, 2 processes, 2 epochs (tests.test_train_ddp.DDP_OPTIONS), each rank's
    last parameters dumped: the uninterrupted run that test_train_ddp's resume and test_multinode's nodes and
    restarts must reproduce. Read-only. (run folder, rank dump prefix, the dumping script)."""
    from tests.test_train_ddp import DDP_OPTIONS, RANK_DUMP, torchrun
    tmp = tmp_path_factory.mktemp("two-processes")
    script = tmp / "rank_dump.py"
    script.write_text(RANK_DUMP)
    torchrun(script, tmp / "full-rank", *DDP_OPTIONS, "--data", ingested, "--runs-dir", tmp, "--name", "full")
    return tmp / "full", tmp / "full-rank", script
