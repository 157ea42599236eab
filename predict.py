"""Classify photos with a trained run, preprocessed exactly as its test split was: `python predict.py --run
runs/<name> PHOTOS... [--out predictions.csv] [--top-k 3]`, or export the run's model for use without fastpix:
`python predict.py --run runs/<name> --export model.onnx` (or model.pt, TorchScript). See docs/predict.md.

PHOTOS are files, folders (walked as ingest walks them) or .txt files listing paths. One CSV row per photo: its
path, the top-k classes with their probabilities, the run's name, and the reason when it could not be read (the
reason ingest's quarantine gives). Exit code 0 when every photo was read, 1 when some were not, 2 for what the
user must fix first (no run, a damaged checkpoint, another dataset than the run's).
"""
import csv
import io
import itertools
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from cli import Parser, UsageError, add_options, check_options, config_from, option, run
from files import write_text
from loaders.common import Normalizer, resolve_device, resolve_workers
from predicting.photos import decode_on_gpu, find_photos, prepare, prepared
from predicting.tested import load_run


@dataclass
class Config:
    """Every option of predict.py, each declared once with its flag (`cli.option`); PHOTOS are positional."""
    run: str = option("", "the run folder (runs/<name>) whose tested model classifies")
    out: str = option("predictions.csv", "the CSV to write, one row per photo")
    top_k: int = option(3, "classes (with probabilities) per row, most likely first", minimum=1)
    checkpoint: str = option("", "a checkpoint of the run other than its last.pt")
    data: str = option("", "the run's ingested dataset, if it moved (default: the one in its config.json)")
    export: str = option("", "write the model to this file instead (.onnx: ONNX, .pt: TorchScript) with a sidecar "
                         "JSON of what it expects, after checking its logits against the eager model's")
    batch_size: int = option(64, "photos per forward pass", minimum=1)
    workers: int | None = option(None, "decode/preprocess processes (default: one per core; 0: in this process)",
                                 minimum=0)
    device: str = option("auto", "auto, cpu or cuda")
    photos: tuple = ()  # files, folders, .txt lists (positional)


def predict_photos(tested, photos, *, batch_size=64, workers=None, device=torch.device("cpu"), progress=True):
    """Yield (path, probabilities (numpy, one per class) or None, reason) for every (path, reason) of `photos`
    (predicting.photos.find_photos), in order: decoded and preprocessed in `workers` processes while the model
    runs batches under the run's autocast."""
    normalize = Normalizer(device)
    items = zip(photos, prepared(photos, tested.ingested, tested.res, resolve_workers(workers),
                                 gpu=device.type == "cuda"))
    with tqdm(total=len(photos), desc="predict", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        while chunk := [(path, *item) for (path, _), item in itertools.islice(items, batch_size)]:
            chunk = on_device(chunk, tested, device)
            images = [image for _, image, _ in chunk if image is not None]
            probs = iter(classify(tested, torch.stack(images), normalize, device) if images else ())
            for path, image, reason in chunk:
                yield path, (next(probs) if image is not None else None), reason
            bar.update(len(chunk))


def on_device(chunk, tested, device):
    """[(path, prepared item, reason)] with every usable item a uint8 3 x res x res tensor on the device. JPEG
    bytes (a GPU's share) are decoded in one nvJPEG batch; if the batch fails (a photo the header check passed
    but nvJPEG cannot decode), each of them takes the CPU path, which names the culprit's reason."""
    jpegs = [k for k, (_, item, _) in enumerate(chunk) if isinstance(item, (bytes, bytearray))]
    decoded = {}
    if jpegs:
        try:
            decoded = dict(zip(jpegs, decode_on_gpu([chunk[k][1] for k in jpegs], tested.ingested, tested.res,
                                                    device)))
        except RuntimeError:
            for k in jpegs:
                chunk[k] = (chunk[k][0], *prepare(chunk[k][0], tested.ingested, tested.res))
    return [(path, decoded[k] if k in decoded else
             None if item is None else torch.from_numpy(item).permute(2, 0, 1).to(device, non_blocking=True), reason)
            for k, (path, item, reason) in enumerate(chunk)]


def classify(tested, images, normalize, device):
    """Softmax probabilities (numpy, N x classes) of a uint8 N x 3 x res x res batch on the device."""
    with torch.no_grad(), tested.autocast(device):
        return tested.model(normalize(images)).float().softmax(1).cpu().numpy()


# ----------------------------------------------------------------------------------------------- CLI

def csv_text(rows, classes, top_k, run_name):
    """The CSV of (path, probabilities or None, reason) rows: path, class_i and prob_i for i in 1..top_k, run,
    reason (empty when the photo was read)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", *itertools.chain.from_iterable((f"class_{i}", f"prob_{i}") for i in
                                                             range(1, top_k + 1)), "run", "reason"])
    for path, probs, reason in rows:
        top = [] if probs is None else np.argsort(-probs, kind="stable")[:top_k]
        cells = itertools.chain.from_iterable((classes[c], f"{probs[c]:.6f}") for c in top)
        writer.writerow([path, *cells, *[""] * (2 * (top_k - len(top))), run_name, reason])
    return out.getvalue()


def parse(argv=None):
    parser = add_options(Parser(prog="python predict.py", description="Classify photos with a trained run's model, "
                                "preprocessed as its test split was, or export the model (docs/predict.md)."), Config)
    parser.add_argument("photos", nargs="*", metavar="PHOTOS", help="photo files, folders, or .txt lists of paths "
                        "(default: none; needed unless --export)")
    args = parser.parse_args(argv)
    cfg = replace(config_from(Config, args), photos=tuple(args.photos))
    check_options(cfg)
    if not cfg.run:
        raise UsageError("--run is required: the run folder whose model classifies (runs/<name>)")
    if bool(cfg.export) == bool(cfg.photos):
        raise UsageError("give PHOTOS to classify, or --export FILE to export the model: one of the two")
    return cfg


def main(argv=None):
    cfg = parse(argv)
    device = resolve_device(cfg.device)
    tested = load_run(cfg.run, cfg.checkpoint, cfg.data, device)
    if cfg.export:
        from predicting.export import export
        export(tested, cfg.export, device)
        return 0
    if cfg.top_k > len(tested.classes):
        raise UsageError(f"--top-k {cfg.top_k} is more than the run's {len(tested.classes)} classes")
    photos = find_photos(cfg.photos)
    started = time.perf_counter()
    rows = list(predict_photos(tested, photos, batch_size=cfg.batch_size, workers=cfg.workers, device=device))
    seconds = time.perf_counter() - started
    write_text(cfg.out, csv_text(rows, tested.classes, cfg.top_k, tested.name))
    unread = sum(probs is None for _, probs, _ in rows)
    print(f"{len(rows) - unread} of {len(rows)} photos classified by {tested.name} in {seconds:.1f} s "
          f"({len(rows) / max(seconds, 1e-9):.0f} img/s) -> {cfg.out}"
          + (f"; {unread} could not be read (see the reason column)" if unread else ""), file=sys.stderr)
    return 1 if unread else 0


if __name__ == "__main__":
    run(main)
