"""How the suite is spread over pytest-xdist's workers (tests/conftest.py): a test file is never split, so its module
fixtures are made once, and test_multinode goes with test_train_ddp, whose DDP run it shares. (xdist's own
loadgroup once stopped grouping without a word: every test ran, each module's fixtures were made on both workers.)"""
import pytest

import conftest


def test_a_worker_takes_whole_files_and_the_ddp_files_together(pytestconfig, monkeypatch):
    pytest.importorskip("xdist")
    monkeypatch.setattr(pytestconfig.option, "dist", "loadfile")
    monkeypatch.setattr(pytestconfig.option, "tx", ["2*popen"])  # what -n 2 sets
    scope = conftest.pytest_xdist_make_scheduler(pytestconfig, None)._split_scope
    assert scope("tests/test_damage_matrix.py::test_cell[tar-flip-dali]") == scope("tests/test_damage_matrix.py::t")
    assert scope("tests/test_multinode.py::test_kill") == scope("tests/test_train_ddp.py::test_resume")
    assert scope("tests/test_nets.py::test_shapes") != scope("tests/test_cli.py::test_shapes")
    monkeypatch.setattr(pytestconfig.option, "dist", "load")  # a --dist chosen on the command line is kept
    assert conftest.pytest_xdist_make_scheduler(pytestconfig, None) is None
