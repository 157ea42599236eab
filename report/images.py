"""Pictures of what a run saw and learnt: the train batch as the model receives it (samples.png), the first
conv layer's filters (filters.png), one test image through every conv layer (feature_maps.png) and test
images with their predictions (predictions.png). Inputs are the loaders' normalised batches."""
import math

import torch
from matplotlib import colormaps
from torch import nn
from torchvision.utils import make_grid

from loaders.common import IMAGENET_MEAN, IMAGENET_STD
from report.plots import DPI, plt, save


def denormalise(images):
    """The loaders' normalised float images back to RGB in [0, 1] on the CPU, (N, H, W, 3) for imshow."""
    images = images.detach().float().cpu()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) / 255
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def _montage(rows, width, lines, fontsize, framed=False):
    """rows of (h, w, 3) tiles in [0, 1], all one size -> a white uint8 image about `width`
    inches wide at report.plots.DPI, each tile enlarged by a whole factor (nearest: a pixel stays a square) with a
    band above each row for `lines` lines of `fontsize` points, and each cell's top-left corner (y, x). `framed`:
    a grey line around each tile, so a picture with white edges still shows where it ends. One imshow drawn one
    to one instead of an axes per tile: the axes were most of a report's time (resnet18's 168 feature maps took
    3.3 s of CPU, 0.6 s as one image)."""
    h, w = rows[0][0].shape[:2]
    cols, pad = max(len(row) for row in rows), 6
    scale = max(1, int(width * DPI / cols - pad) // w)
    h, w = h * scale, w * scale
    band = math.ceil((lines * 1.3 + 0.5) * fontsize / 72 * DPI)  # lines and a gap, points -> pixels
    step = band + h + pad
    canvas = torch.full((len(rows) * step + pad, cols * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    corners = []
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            y, x = r * step + pad, c * (w + pad) + pad
            corners.append((y, x))
            if framed:
                canvas[y + band - 1:y + band + h + 1, x - 1:x + w + 1] = 150
            big = tile.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
            canvas[y + band:y + band + h, x:x + w] = (big * 255).round().to(torch.uint8)
    return canvas, corners


def _save_montage(canvas, texts, path, fontsize):
    """The montage drawn pixel for pixel, with texts [(y, x, text, colour)] written into its bands."""
    height, width = canvas.shape[:2]
    fig = plt.figure(figsize=(width / DPI, height / DPI))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas.numpy(), interpolation="nearest")
    ax.axis("off")
    for y, x, text, colour in texts:
        ax.text(x, y, text, fontsize=fontsize, color=colour, va="top", ha="left")
    save(fig, path, tight=False)


def _image_grid(images, titles, path, colours=None, cols=8):
    """`images` (N, H, W, 3), `cols` to a row, each with its title above it."""
    lines = max(title.count("\n") + 1 for title in titles)
    rows = [list(images[i:i + cols]) for i in range(0, len(images), cols)]
    canvas, corners = _montage(rows, 1.6 * cols, lines, fontsize=6, framed=True)
    _save_montage(canvas, [(y, x, title, (colours or {}).get(i, "black"))
                           for i, ((y, x), title) in enumerate(zip(corners, titles))], path, fontsize=6)


def plot_samples(images, labels, classes, path, count=32):
    """samples.png: a train batch exactly as the model receives it (crop, flip, resolution), de-normalised."""
    shown = denormalise(images[:count])
    _image_grid(shown, [classes[int(y)] for y in labels[:count]], path)


def plot_filters(model, path):
    """filters.png: every filter of the first conv layer, each scaled to its own range."""
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    weights = first.weight.detach().float().cpu()
    grid = make_grid(weights[:, :3], nrow=16, normalize=True, scale_each=True, padding=1, pad_value=1)
    fig, ax = plt.subplots(figsize=(8, 8 * grid.shape[1] / grid.shape[2]))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_title(f"first conv layer: {weights.shape[0]} filters of {weights.shape[2]}x{weights.shape[3]}",
                 fontsize=9)
    ax.axis("off")
    save(fig, path)


def feature_maps(model, image):
    """{conv layer name: its output (C, H, W), before any in-place activation} for one normalised image, in
    forward order (hooks)."""
    maps, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda m, i, out, name=name: maps.__setitem__(name, out[0].detach().float().cpu().clone())))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(image[None])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return maps


def _coloured(maps, size):
    """Feature maps (C, H, W) -> (C, size, size, 3) viridis tiles, each map scaled to its own range as imshow
    scales it."""
    low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    scaled = ((maps - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    scaled = nn.functional.interpolate(scaled[None], size=(size, size), mode="nearest")[0]
    return torch.from_numpy(colormaps["viridis"](scaled.numpy())[..., :3]).float()


def plot_feature_maps(model, image, path, channels=8):
    """feature_maps.png: the image, then one row per conv layer showing its first `channels` output maps."""
    maps = feature_maps(model, image)
    size = min(96, max(max(out.shape[1:]) for out in [image, *maps.values()]))
    shown = nn.functional.interpolate(denormalise(image[None]).permute(0, 3, 1, 2), size=(size, size),
                                      mode="area" if image.shape[-1] > size else "nearest")
    rows = [[shown[0].permute(1, 2, 0)]] + [list(_coloured(out[:channels], size)) for out in maps.values()]
    canvas, corners = _montage(rows, 1.3 * channels, 1, fontsize=7)
    starts = [sum(len(row) for row in rows[:k]) for k in range(len(rows))]  # each row's first cell
    titles = ["input"] + [f"{name}: {out.shape[0]} x {out.shape[1]} x {out.shape[2]}" for name, out in maps.items()]
    _save_montage(canvas, [(*corners[start], title, "black") for start, title in zip(starts, titles)], path,
                  fontsize=7)
    return maps


def plot_predictions(images, y_true, y_pred, confidence, classes, path, each=8):
    """predictions.png: up to `each` correct (green) then up to `each` wrong (red) test images, titled with the
    true class, the predicted one and the model's confidence in it."""
    hit = y_true == y_pred
    picked = hit.nonzero()[0][:each].tolist() + (~hit).nonzero()[0][:each].tolist()
    titles = [f"true {classes[y_true[i]]}\npred {classes[y_pred[i]]} {confidence[i]:.2f}" for i in picked]
    colours = {k: "green" if hit[i] else "red" for k, i in enumerate(picked)}
    _image_grid(denormalise(images[picked]), titles, path, colours)
    return picked
