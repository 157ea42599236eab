"""train.py --recipe: `study` (the default) trains exactly as the plain loop the study ran, step for step and
bit for bit; `fast` turns on each of its pieces when asked and none when not, and a tiny fast run trains at
the scheduled resolution of every epoch and records its pieces."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nets
import train
from report.runlog import read_metrics
from cli import UsageError
from loaders import make_loader
from training import recipe
from training.resume import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread", "small_flat_head")


def tiny(ingested, runs, name, **overrides):
    """~65 train samples, batch 16 -> 4 steps per epoch (as tests/test_train.py)."""
    options = dict(net="resnet18", loader="resident", data=str(ingested), res=32, batch_size=16, epochs=2,
                   lr=0.01, warmup=0.5, amp="off", runs_dir=str(runs), name=name, workers=1, bootstrap=50,
                   log_every=3)
    return train.Config(**{**options, **overrides})


def plain_study_loop(cfg, num_classes):
    """The study's training written out by hand (what train.py ran before recipes existed): seeded init,
    channels_last, fused SGD with momentum and weight decay, linear warm-up then cosine per step, plain
    cross-entropy over full batches. Returns the per-step losses and the final weights."""
    seed_everything(cfg.seed)
    model = nets.build(cfg.net, num_classes).to(memory_format=torch.channels_last).train()
    loader = make_loader(cfg.loader, cfg.data, "train", batch_size=cfg.batch_size, res=cfg.res, device="cpu",
                         seed=cfg.seed, workers=cfg.workers)
    steps = loader.num_samples // cfg.batch_size
    total, warmup = cfg.epochs * steps, round(cfg.warmup * steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, fused=True)
    cosine = lambda s: (s + 1) / warmup if s < warmup else \
        0.5 * (1 + math.cos(math.pi * min((s - warmup) / (total - warmup), 1.0)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    losses = []
    for epoch in range(cfg.epochs):
        loader.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(steps):
            images, labels = next(batches)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    return losses, model.state_dict()


@pytest.mark.slow
def test_study_is_the_default_and_bit_identical_to_the_plain_loop(ingested, tmp_path):
    assert train.Config().recipe == "study" and train.parse([]).recipe == "study"
    cfg = tiny(ingested, tmp_path, "study")
    summary = train.train(cfg)
    steps, _ = read_metrics(summary["run_dir"])
    classes = json.loads((Path(summary["run_dir"]) / "config.json").read_text())["classes"]
    losses, weights = plain_study_loop(tiny(ingested, tmp_path, "unused"), len(classes))
    assert [s["loss"] for s in steps] == losses  # exact floats, every step
    saved = torch.load(Path(summary["run_dir"]) / train.CHECKPOINT, weights_only=True)
    assert saved.keys() >= {"model"} and saved["config"]["pieces"] == ()
    for key, value in weights.items():
        assert torch.equal(saved["model"][key], value), key


def observed_pieces(run, evaluated_with_flip):
    """The pieces a built Run actually uses, read from its parts, not from its config."""
    cfg, on = run.cfg, set()
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in run.model.modules()):
        on.add("batchnorm")
    if run.label_smoothing > 0:
        on.add("label_smoothing")
    if [g["weight_decay"] for g in run.optimizer.param_groups] == [cfg.weight_decay, 0.0]:
        on.add("no_bn_decay")
    if run.ema is not None:
        on.add("ema")
    total = cfg.epochs * run.steps_per_epoch
    if run.scheduler.lr_lambdas[0](total - 1) != recipe.lr_factor(total - 1, round(cfg.warmup * run.steps_per_epoch),
                                                                 total):
        on.add("onecycle")
    schedule = [recipe.train_res(cfg, e) for e in range(cfg.epochs)]
    if schedule[0] < schedule[-1]:
        on.add("progressive")
    if schedule[-1] < cfg.res:
        on.add("fixres")
    if evaluated_with_flip:
        on.add("flip_tta")
    return on


@pytest.mark.slow
@pytest.mark.parametrize("without", [None, *(pytest.param(p, marks=pytest.mark.slow) for p in recipe.RECIPE_PIECES)])
def test_fast_pieces_are_on_when_asked_and_off_otherwise(without, ingested, tmp_path, monkeypatch):
    flips = []
    monkeypatch.setattr(train, "evaluate", lambda *args, flip=False: flips.append(flip) or ([0], [0], [1.0]))
    if without is None:  # the study, then fast with every piece
        cases = [(dict(), set()), (dict(recipe="fast"), set(train.FAST_DEFAULT))]
    else:  # the ablation: each piece off in turn
        pieces = tuple(p for p in recipe.RECIPE_PIECES if p != without)
        cases = [(dict(recipe="fast", pieces=pieces), set(pieces))]
    for i, (options, expected) in enumerate(cases):
        cfg = tiny(ingested, tmp_path, f"run{i}", net="flat", res=128, epochs=5, **options)
        train.check(cfg)
        run = train.Run(cfg, 0, 1, torch.device("cpu"))
        run.writer = False  # evaluate only: no metrics to write
        run.test_epoch({})
        assert observed_pieces(run, flips.pop()) == expected
        config = json.loads((run.dir / "config.json").read_text())["config"]
        assert set(config["pieces"]) == expected and config["batchnorm"] == ("batchnorm" in expected)


def test_progressive_and_fixres_schedule():
    cfg = train.Config(res=128, epochs=5, recipe="fast", pieces=("progressive",))
    assert [recipe.train_res(cfg, e) for e in range(5)] == [80, 96, 112, 128, 128]
    cfg.pieces = ("progressive", "fixres")  # tops out at 128 / 1.15 ~ 112
    assert [recipe.train_res(cfg, e) for e in range(5)] == [64, 80, 96, 112, 112]
    cfg.pieces = ("fixres",)
    assert [recipe.train_res(cfg, e) for e in range(5)] == [112] * 5
    assert [recipe.train_res(train.Config(res=128, epochs=5), e) for e in range(5)] == [128] * 5


@pytest.mark.slow
def test_a_tiny_fast_run_trains_at_the_scheduled_res_and_records_its_pieces(ingested, tmp_path):
    cfg = tiny(ingested, tmp_path, "fast", recipe="fast", res=64, epochs=3)
    summary = train.train(cfg)
    _, epochs = read_metrics(summary["run_dir"])
    assert [e["res"] for e in epochs] == [recipe.train_res(cfg, e) for e in range(3)] == [32, 48, 56]
    assert all(math.isfinite(e["train_loss"]) for e in epochs) and summary["stopped"] is None
    config = json.loads((Path(summary["run_dir"]) / "config.json").read_text())["config"]
    assert config["recipe"] == "fast" and tuple(config["pieces"]) == train.FAST_DEFAULT
    assert config["batchnorm"] is False  # resnet18 brings its own batch norm


def test_recipe_mistakes_are_one_line(ingested, tmp_path):
    with pytest.raises(UsageError, match="unknown recipe"):
        train.check(tiny(ingested, tmp_path, "x", recipe="quick"))
    with pytest.raises(UsageError, match="add --recipe fast"):
        train.check(tiny(ingested, tmp_path, "x", pieces=("ema",)))
    with pytest.raises(UsageError, match="unknown recipe piece 'emma'"):
        train.check(tiny(ingested, tmp_path, "x", recipe="fast", pieces=("emma",)))
    assert train.parse(["--recipe", "fast", "--pieces", "ema,flip_tta"]).pieces == ("ema", "flip_tta")
