"""The tested model as a file that runs without fastpix: ONNX (for onnxruntime and the runtimes that read ONNX) or
TorchScript (torch.jit.load), with a sidecar JSON of what it expects (classes, res, mean, std, the resize rule),
sealed with its own checksum and the model file's sha256, so that code reading it can tell it is whole and
the model's (docs/predict.md's example checks both).

Nothing is written unless it passes: on 64 test photos of the run's dataset (the loaders' own test batches), the
exported model's fp32 logits must match the eager model's within PARITY_BOUND, else one line names the largest
difference and no file is left behind.
"""
import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from cli import UsageError
from files import atomic_path, seal, write_json
from ingest.layout import file_sha256
from loaders import make_loader
from loaders.common import IMAGENET_MEAN, IMAGENET_STD, test_resize

FORMATS = {".onnx": "onnx", ".pt": "torchscript"}
PARITY_PHOTOS = 64
# Largest |exported - eager| fp32 logit allowed, relative to the largest |eager logit| (at least 1). Measured on
# the tests' resnet18 run: onnxruntime 2.3e-6 (its convolutions sum in another order), TorchScript 0 (the same
# kernels); 1e-4 leaves room for other CPUs, while a wrong op, layout or weight is off by far more.
PARITY_BOUND = 1e-4


def export(tested, path, device):
    """Write `tested`'s model to `path` (format by suffix) and `<path>.json`, after the parity check; returns the
    sidecar's content."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise UsageError(f"--export {path}: name it .onnx (ONNX) or .pt (TorchScript)")
    images = parity_images(tested)
    model = tested.model.to("cpu").float().eval()
    with torch.no_grad():
        eager = model(images).numpy()
    with atomic_path(path) as tmp:
        if FORMATS[path.suffix] == "onnx":
            exported = export_onnx(model, images, tmp)
        else:
            exported = export_torchscript(model, images, tmp)
        difference = float(np.abs(exported - eager).max())
        bound = PARITY_BOUND * max(1.0, float(np.abs(eager).max()))
        if not difference <= bound:  # NaN fails too
            raise UsageError(f"--export {path}: the exported model's logits differ from the eager model's by up to "
                             f"{difference:.3g} on {len(images)} test photos, more than the fp32 bound {bound:.3g}: "
                             "nothing written")
    sidecar = seal({**describe(tested, FORMATS[path.suffix], len(images), difference, bound),
                    "model_sha256": file_sha256(path)})  # a reader can tell a damaged or another model's sidecar
    write_json(Path(f"{path}.json"), sidecar)
    print(f"exported {tested.name} to {path} ({FORMATS[path.suffix]}) and {path}.json: logits within "
          f"{difference:.2g} of the eager model's on {len(images)} test photos (bound {bound:.2g})")
    tested.model.to(device)
    return sidecar


def parity_images(tested):
    """The first PARITY_PHOTOS test images of the run's dataset, as the torch backend's test pass makes them."""
    loader = make_loader("torch", tested.data, "test", batch_size=PARITY_PHOTOS, res=tested.res, device="cpu",
                         workers=0)
    images, _ = next(iter(loader))
    return images.clone()


def export_onnx(model, images, path):
    """ONNX through torch.export (the dynamo exporter), batch size left free; its logits through onnxruntime."""
    import onnxruntime

    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's own progress lines
        program = torch.onnx.export(model, (images,), dynamo=True, input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},))
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images.contiguous().numpy()})[0]


def export_torchscript(model, images, path):
    """TorchScript by tracing (flip TTA is fixed at export); its logits through torch.jit.load."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but TorchScript is what was asked
        torch.jit.trace(model, images[:2]).save(str(path))
        return torch.jit.load(str(path)).eval()(images).numpy()


def describe(tested, fmt, photos, difference, bound):
    """The sidecar: what the model expects and how a photo becomes that, for code that never imports fastpix."""
    return {
        "format": fmt, "run": tested.name, "checkpoint": str(tested.checkpoint), "classes": tested.classes,
        "input": "float32 N x 3 x res x res, RGB, (pixel / 255 - mean) / std per channel",
        "output": "logits N x classes; softmax gives the probabilities",
        "res": tested.res, "mean": [m / 255 for m in IMAGENET_MEAN], "std": [s / 255 for s in IMAGENET_STD],
        "store_size": tested.ingested.store_size, "resize_to": test_resize(tested.res),
        "resize_rule": ("turn upright from EXIF; make RGB (alpha over white); shrink so the shorter side is "
                        "store_size (never enlarge); resize so the shorter side is resize_to; center-crop res x "
                        "res. Resizes are antialiased bilinear."),
        "flip_tta": tested.model.flip, "min_side": tested.ingested.min_side,
        "parity": {"photos": photos, "max_abs_logit_difference": difference, "bound": bound},
    }
