"""The test pass: every test sample's label, prediction and confidence, exactly once, in id order."""
import torch

from training.device import gather_to_rank0


def evaluate(model, loader, autocast, world, relabel, flip=False):
    """Labels, predictions and the softmax confidence of each prediction for every test sample exactly once,
    in id order, on rank 0 (None elsewhere: only rank 0 computes metrics and writes); flip: logits of each
    image averaged with those of its mirror."""
    model.eval()
    preds, confs, labels = [], [], []
    with torch.no_grad(), autocast():
        for images, y in loader:
            logits = model(images)
            if flip:
                logits = (logits + model(images.flip(3))) / 2
            conf, pred = logits.float().softmax(1).max(1)
            preds.append(pred)
            confs.append(conf)
            labels.append(relabel(y))
    model.train()
    # Ranks own contiguous id blocks (loaders.common.rank_ids), so rank order is id order.
    gathered = gather_to_rank0((torch.cat(labels).cpu(), torch.cat(preds).cpu(), torch.cat(confs).cpu()), world)
    if gathered is None:
        return None, None, None
    return tuple(torch.cat(part).numpy() for part in zip(*gathered))


def test_examples(model, loader, autocast, relabel, each=8, max_batches=8):
    """Test images (copied to the CPU: loaders reuse their buffers) with labels, predictions and confidence,
    from the first test batches, until `each` right and `each` wrong ones are in or max_batches are read."""
    kept, hits, misses = [], 0, 0
    model.eval()
    with torch.no_grad(), autocast():
        for i, (images, labels) in enumerate(loader):
            labels = relabel(labels)
            conf, pred = model(images).float().softmax(1).max(1)
            kept.append((images.to("cpu", torch.float32, copy=True), labels.cpu(), pred.cpu(), conf.cpu()))
            right = int((pred == labels).sum())
            hits, misses = hits + right, misses + len(labels) - right
            if (hits >= each and misses >= each) or i + 1 == max_batches:
                break
    model.train()
    images, y_true, y_pred, confidence = (torch.cat(part) for part in zip(*kept))
    return images, y_true.numpy(), y_pred.numpy(), confidence.numpy()
