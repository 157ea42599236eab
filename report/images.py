"""Pictures of what a run saw and learnt: the train batch as the model receives it (samples.png), the first
conv layer's filters (filters.png), one test image through every conv layer (feature_maps.png) and test
images with their predictions (predictions.png). Inputs are the loaders' normalised batches."""
import torch
from torch import nn
from torchvision.utils import make_grid

from loaders.common import IMAGENET_MEAN, IMAGENET_STD
from report.plots import plt, save


def denormalise(images):
    """The loaders' normalised float images back to RGB in [0, 1] on the CPU, (N, H, W, 3) for imshow."""
    images = images.detach().float().cpu()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) / 255
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def _image_grid(images, titles, path, colours=None, cols=8):
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(images):  # framed, no ticks: a picture with white edges still shows where it ends
            ax.imshow(images[i].numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(titles[i], fontsize=6, color=(colours or {}).get(i, "black"))
        else:
            ax.axis("off")
    save(fig, path)


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


def plot_feature_maps(model, image, path, channels=8):
    """feature_maps.png: the image, then one row per conv layer showing its first `channels` output maps."""
    maps = feature_maps(model, image)
    fig, axes = plt.subplots(len(maps) + 1, channels, figsize=(1.3 * channels, 1.4 * (len(maps) + 1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(denormalise(image[None])[0].numpy())
    axes[0, 0].set_title("input", fontsize=7)
    for row, (name, out) in zip(axes[1:], maps.items()):
        for c, ax in enumerate(row[:len(out)]):
            ax.imshow(out[c].numpy(), cmap="viridis")
        row[0].set_title(f"{name}: {out.shape[0]} x {out.shape[1]} x {out.shape[2]}", fontsize=7, loc="left")
    save(fig, path)
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
