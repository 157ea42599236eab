"""The demo commands never replace data they did not make (issue 10, item 1)."""
import shutil

import pytest

import cli
import ingest.build
import ingest.demo
from bench import demo as bench_demo
from ingest import layout
from test_ingest_rebuild import outputs


def test_bench_demo_refuses_a_dataset_it_did_not_make(ingested, tmp_path, capsys, monkeypatch):
    """Before: `python -m bench.demo --data X` re-ingested the demo into X, over the dataset X held."""
    data = tmp_path / "mine"
    shutil.copytree(ingested, data)
    before = outputs(data)
    monkeypatch.setattr(ingest.demo, "generate", lambda *a, **k: None)  # the 1,400 photos are not the point
    monkeypatch.setattr(ingest.build, "build", lambda *a, **k: pytest.fail("the demo was ingested over X"))
    with pytest.raises(SystemExit) as exit_:
        cli.run(bench_demo.main, ["--data", str(data)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert f"holds a dataset ingested from {layout.read_manifest(data)['source']}" in err and "--force" in err
    assert outputs(data) == before


def test_bench_demo_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(cli.UsageError, match="holds files that are not a demo dataset"):
        bench_demo.make_demo_data(tmp_path / "notes", src=tmp_path / "src")


def test_demo_generator_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(cli.UsageError, match="not empty and holds no complete demo"):
        ingest.demo.generate(tmp_path / "photos", ingest.demo.DemoConfig(per_class=3, classes=("a", "b")))
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["holiday.jpg"]
