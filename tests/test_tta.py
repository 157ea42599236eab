"""bench.tta on the tiny demo: both recipes side by side and one ablation run (one seed: each run is a process
of its own; the mean over seeds is checked on made-up curves), every promised output with its fields, time to
target read off the accuracy curves, and one-line errors."""
import json

import pytest

from bench.tta import TtaConfig, config_from_args, main, plan, summarize, time_to, tta
from cli import UsageError, run
import train


@pytest.mark.slow
def test_tta_trains_both_recipes_and_writes_table_json_plot(ingested, tmp_path):
    out = tmp_path / "tta"
    cfg = TtaConfig(data=ingested, net="resnet18", loader="resident", epochs=2, batch_size=16, res=32, seeds=(0,),
                    ablation_seeds=(0,), ablate=("ema",), workers=1, amp="off", out=out)
    out_dir, lines = tta(cfg, progress=False)
    saved = json.loads((out / "results.json").read_text())
    rows = saved["rows"]
    assert [(r["label"], r["seed"]) for r in rows] == [("study", 0), ("fast", 0), ("fast - ema", 0)]
    for r in rows:
        assert not r.get("error"), r
        walls = [p["wall_s"] for p in r["curve"]]
        assert len(walls) == 2 and 0 < walls[0] < walls[1] == r["wall_s"] and r["images_per_sec"] > 0
        assert r["test_acc_ci"][0] <= r["test_acc"] <= r["test_acc_ci"][1]
    assert saved["targets"] == {"0": rows[0]["test_acc"]}  # the seed's study final
    assert [line["label"] for line in lines] == ["study", "fast", "fast - ema"]
    study = lines[0]
    assert study["reached"] == 1 and study["time_to_target_s"] <= study["wall_s"]
    assert [p["res"] for p in rows[1]["curve"]] == [16, 24]  # progressive + fixres at res 32 over 2 epochs
    config = json.loads((out / "runs" / "fast-no-ema-seed0" / "config.json").read_text())["config"]
    assert config["recipe"] == "fast" and set(config["pieces"]) == set(train.FAST_DEFAULT) - {"ema"}
    table = (out / "table.md").read_text()
    assert "| study |" in table and "| fast |" in table and "Ablation" in table and "| fast - ema |" in table
    assert (out / "tta.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("runs/*/last.pt"))  # no weights kept


def test_time_to_target_and_summary():
    def row(label, seed, accs, recipe="fast", without=None):
        curve = [{"wall_s": 10.0 * (i + 1), "test_acc": a} for i, a in enumerate(accs)]
        return {"label": label, "recipe": recipe, "without": without, "seed": seed, "curve": curve,
                "wall_s": curve[-1]["wall_s"], "images_per_sec": 5.0, "test_acc": accs[-1], "test_acc_ci": (0, 1)}

    rows = [row("study", 0, [0.1, 0.2, 0.4], "study"), row("study", 1, [0.1, 0.3, 0.4], "study"),
            row("fast", 0, [0.4, 0.5, 0.6]), row("fast", 1, [0.3, 0.45, 0.5]),
            row("fast - ema", 0, [0.1, 0.2, 0.3], without="ema")]
    assert time_to(rows[0], 0.4) == 30.0 and time_to(rows[4], 0.4) is None
    study, fast, ablated = summarize(rows, {0: 0.4, 1: 0.4})
    assert study["time_to_target_s"] == 30.0 and fast["time_to_target_s"] == 15.0
    assert fast["time_ratio_to_study"] == 0.5 and fast["test_acc"] == pytest.approx(0.55)
    assert ablated["time_to_target_s"] is None and ablated["reached"] == 0  # never reached: no mean that flatters


def test_plan_interleaves_recipes_per_seed_then_ablates():
    cfg = TtaConfig(seeds=(0, 1), ablation_seeds=(0,))
    assert plan(cfg, ("ema", "fixres")) == [("study", None, 0), ("fast", None, 0), ("study", None, 1),
                                            ("fast", None, 1), ("fast", "ema", 0), ("fast", "fixres", 0)]


def test_arguments(tmp_path, capsys):
    cfg = config_from_args(["--seeds", "0,1,2", "--ablation-seeds", "", "--ablate", "ema"])
    assert cfg.seeds == (0, 1, 2) and cfg.ablation_seeds == () and cfg.ablate == ("ema",)
    with pytest.raises(UsageError, match="not a piece"):
        config_from_args(["--ablate", "emma"])
    with pytest.raises(UsageError, match="among --seeds"):
        config_from_args(["--seeds", "0,1", "--ablation-seeds", "2"])
    with pytest.raises(UsageError, match="unknown loader"):
        config_from_args(["--loader", "nope"])
    with pytest.raises(SystemExit) as exit_:  # the command as python -m bench.tta runs it
        run(main, ["--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error:") and err.count("\n") == 1


def test_one_tta_per_results_folder(ingested, tmp_path):
    from files import Busy, one_writer
    cfg = TtaConfig(data=ingested, net="resnet18", seeds=(0,), ablation_seeds=(), out=tmp_path / "tta")
    with one_writer(cfg.out):
        with pytest.raises(Busy, match=r"tta is being written by pid \d+ .*: wait for it to end, or stop it"):
            tta(cfg, progress=False)
    assert not list(cfg.out.iterdir())  # nothing written: not even the marker
