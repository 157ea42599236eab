"""sha256 over tensors' bytes, one way, for the files fastpix writes with tensors in them: a checkpoint
(training.runfolder.state_digest) and the resident loader's disk copy (loaders.resident_cache.content_digest)
record it, so that bytes flipped inside a tensor, which torch.load reads without complaint, are noticed. Each
keeps the headers (names, dtypes, shapes) its files were written with, so older files still verify."""
import torch

CHUNK = 1 << 26  # bytes hashed per step: progress shows, and no step holds the GIL long


def hash_tensor(h, tensor, progress=None):
    """Feed hashlib object `h` a host tensor's bytes in C order (whatever its strides), CHUNK bytes at a time,
    advancing `progress` (a tqdm) by each."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    for start in range(0, len(data), CHUNK):
        h.update(data[start:start + CHUNK])
        if progress is not None:
            progress.update(min(CHUNK, len(data) - start))
