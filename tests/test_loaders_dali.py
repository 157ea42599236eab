"""DALI's own screen: a plain pass (no ids asked for) prints none of DALI's warnings, so the README's first
command (python -m bench.demo) shows a new user only what they need (issue 19 item 16)."""
import warnings

from conftest import require
from loaders import make_loader


def test_a_pass_without_ids_leaves_no_external_source_output_unused(ingested, capfd):
    require("dali")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = make_loader("dali", ingested, "train", batch_size=16, res=32, device="cpu", workers=1)
        assert sum(len(labels) for _, labels in loader) == loader.num_samples
    said = [str(w.message) for w in caught] + capfd.readouterr().err.splitlines()
    assert not [line for line in said if "not used" in line or "external source" in line], said
