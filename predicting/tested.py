"""A run folder as the model its test metrics describe: the weights `evaluate` used (the EMA's with --recipe fast),
its flip TTA, its classes (merged ones with --merge), its res and autocast, and the ingest settings of the data
it was trained on (the store-size resize and the quarantine limits), all read from the run and its dataset."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import nets
from cli import UsageError
from ingest.layout import read_manifest
from ingest.remote import local_folder
from training.device import autocast, resolve_amp
from training.labels import merge_classes
from training.runfolder import CHECKPOINT, check_same_run, read_checkpoint


class AsTested(nn.Module):
    """The net as `training.evaluate` tests it: logits, averaged with those of the mirror image under flip TTA.
    One module, so an exported model carries the TTA too."""

    def __init__(self, net, flip):
        super().__init__()
        self.net, self.flip = net, flip

    def forward(self, images):
        logits = self.net(images)
        return (logits + self.net(images.flip(3))) / 2 if self.flip else logits


@dataclass(frozen=True)
class Ingested:
    """What ingest's conversion of a photo needs (ingest.validate.stored_photo), from the dataset's manifest."""
    store_size: int
    min_side: int
    max_pixels: int


@dataclass
class TestedRun:
    name: str
    classes: list
    res: int
    amp: str  # the autocast of the run's test pass, resolved for this device: bf16, fp16 or off
    ingested: Ingested
    model: AsTested  # eval mode, fp32, on the device
    checkpoint: Path
    data: Path  # the run's ingested dataset (its test photos are export's parity check)
    saved: dict  # config.json as train.py wrote it ("config": the settings the run trained with, "world", ...)
    data_classes: list  # the dataset's classes, before --merge
    metrics_sha256: str | None = None  # the checkpoint's record of metrics.jsonl (None before it was recorded)

    def autocast(self, device):
        return autocast(device, self.amp)


def load_run(run_dir, checkpoint="", data="", device=torch.device("cpu"), flag="--run"):
    """The TestedRun of `run_dir`, or one UsageError line: no run there, a damaged checkpoint, one that does not
    match config.json, or a dataset that is not the one the weights were trained on (another fingerprint or other
    classes). `flag` names the run in those lines (predict's --run; the report names the folder alone: "")."""
    run_dir = Path(run_dir)
    named = f"{flag} {run_dir}".strip()
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{named}: no config.json there, so no fastpix run (train one with train.py)")
    try:
        saved = json.loads(config_path.read_text())
        cfg, classes = saved["config"], list(saved["classes"])
        if not isinstance(cfg, dict):
            raise TypeError("no config object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{named}: config.json is damaged ({type(err).__name__})") from None
    path = Path(checkpoint) if checkpoint else run_dir / CHECKPOINT
    checkpoint_flag = "--checkpoint" if checkpoint or flag else ""
    weights = f"{checkpoint_flag} {path}".strip()
    if not path.is_file():
        raise UsageError(f"--checkpoint {path}: no such file" if checkpoint else
                         f"{named}: no {CHECKPOINT} there (the run stopped before its first checkpoint)")
    state = read_checkpoint(checkpoint_flag, path)
    if not isinstance(state, dict) or "model" not in state:
        raise UsageError(f"{weights} is not a fastpix training checkpoint")
    if list(state.get("classes") or classes) != classes:
        raise UsageError(f"{weights} was trained on other classes than the run {run_dir}")
    if not checkpoint:  # the run's own last.pt was trained with config.json's settings
        check_same_run(named, cfg, state.get("config") or {})
    data = Path(local_folder(data or cfg["data"], cfg.get("cache_dir") or None))  # a URL: its node-local cache
    manifest = read_manifest(data)
    ingested = check_dataset(manifest, data, state, cfg, classes, weights)
    net = nets.build(cfg["net"], len(classes), strides=cfg.get("strides"), kernels=cfg.get("kernels"),
                     dropout=cfg.get("dropout", 0.0), batchnorm=cfg.get("batchnorm", False))
    load_tested_weights(net, state, weights)
    model = AsTested(net, flip="flip_tta" in (cfg.get("pieces") or ())).eval().to(device)
    amp = saved.get("amp", "off")
    amp = resolve_amp("auto" if amp == "fp16" and device.type != "cuda" else amp, device)
    return TestedRun(run_dir.resolve().name, classes, cfg["res"], amp, ingested, model, path, data, saved,
                     manifest["classes"], state.get("metrics_sha256"))


def check_dataset(manifest, data, state, cfg, classes, checkpoint):
    """The ingest settings of the run's dataset (`manifest`, read from `data`), which must be the one the weights
    saw (`checkpoint` names the weights in the line that says otherwise)."""
    trained_on = state.get("data_fingerprint")
    if trained_on and manifest["fingerprint"] != trained_on:
        raise UsageError(f"{checkpoint} was trained on dataset {trained_on[:12]}, but {data} is dataset "
                         f"{manifest['fingerprint'][:12]}: pass --data with the dataset it was trained on")
    if merge_classes(manifest["classes"], cfg.get("merge") or ())[0] != classes:
        raise UsageError(f"{data} holds other classes than the run was trained on: pass --data with its dataset")
    return Ingested(manifest["store_size"], manifest["min_side"], manifest["max_pixels"])


def load_tested_weights(net, state, checkpoint):
    """The weights `evaluate` tested: the EMA's (an AveragedModel's state: module.* and its counter) when the
    run kept one, else the model's. A frozen resnet18's FrozenBatchNorm2d has no num_batches_tracked: the plain
    BatchNorm2d built here computes the same in eval mode."""
    weights = state["model"]
    if state.get("ema"):
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    try:
        missing, unexpected = net.load_state_dict(weights, strict=False)
    except (RuntimeError, TypeError, AttributeError) as err:
        missing, unexpected = [str(err).strip().splitlines()[-1].strip()[:160]], []
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise UsageError(f"{checkpoint} does not fit the run's net: {(missing + unexpected)[0]}")
