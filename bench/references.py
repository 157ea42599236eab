"""The rows bench/loaders.py measures beside fastpix's backends: each library's own recommended pipeline over
the same ingested files, and decode-only rates. Each is shaped like a loader (set_epoch, iteration over
(images, labels), num_samples) and built by `ROWS[name](data_dir, split, batch_size=, res=, device=, seed=,
workers=)`.

- `dali-reference`: the train and val pipelines of DALI's ResNet-50 example
  (docs/examples/use_cases/pytorch/resnet50/main.py): image_random_crop (area 0.1-1, aspect 0.8-1.25,
  100 attempts), resize with INTERP_TRIANGULAR, crop_mirror_normalize to float; one pipeline built once,
  seed 12, default prefetch, auto_reset, the outputs of DALIClassificationIterator. Its `readers.file` becomes
  `readers.webdataset` over our shards; `--dali_cpu` is the CPU variant, where the example's `.gpu()`
  before crop_mirror_normalize is left out. One change of layout: crop_mirror_normalize writes HWC (the
  example: CHW), as the `dali` backend does, and torch sees it as NCHW channels_last, so both rows hand over
  the same tensor layout (CHW costs DALI a transposing write).
- `ffcv-reference`: the train and val loaders of ffcv-imagenet (train_imagenet.py), CPU side: the
  RandomResizedCrop / CenterCrop (224/256) decoder, flip (train), ToTensor, ToDevice (GPU), ToTorchImage:
  uint8 NCHW channels_last, QUASI_RANDOM order, os_cache. The example normalises after ToDevice with
  NormalizeImage (float16 on the GPU); here the `ffcv` backend's own normalisation step
  (loaders.common.Normalizer, float32) follows in the timed loop instead, so `ffcv` and `ffcv-reference`
  differ in their FFCV pipelines only. The last partial batch is kept (the example drops it), as the batch
  contract wants, so labels are squeezed on dimension 1 only.
- `decode-torchvision`, `decode-pil`, `decode-dali`: every stored JPEG of the split decoded once per epoch in
  `workers` threads (each library releases the GIL while decoding), nothing else; PIL asks libjpeg-turbo for
  the smallest DCT scale (draft) that keeps the shorter side >= test_resize(res), which any pipeline could use.
  On a GPU torchvision and DALI decode batches with nvJPEG. The fastest is the bench's decode ceiling.

Both take their thread count by the backends' rule (loaders.common.resolve_workers: this process's share of
the cores, at least 1). With `with_ids=True` they also yield each batch's sample ids (a test's check that they
deliver the split: for DALI read from the webdataset key, for FFCV from FFCV's own sample index).
"""
import io
from concurrent.futures import ThreadPoolExecutor

import torch

from loaders.common import IMAGENET_MEAN, IMAGENET_STD, TEST_CROP_RATIO, Normalizer, resolve_workers, test_resize


def _threads(workers):
    """The backends' rule (dali and ffcv): resolve_workers, and at least one thread."""
    return max(resolve_workers(workers), 1)


def dali_reference(data_dir, split, *, batch_size, res, device, seed, workers, with_ids=False):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from ingest import layout
    tars, indexes = layout.shard_paths(data_dir, split)
    on_gpu = device.type == "cuda"

    @pipeline_def(batch_size=batch_size, num_threads=_threads(workers), device_id=(device.index or 0) if on_gpu else None,
                  seed=12)
    def graph():
        jpegs, labels = fn.readers.webdataset(paths=[str(t) for t in tars], index_paths=[str(i) for i in indexes],
                                              ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT64],
                                              random_shuffle=split == "train", pad_last_batch=True, name="Reader")
        decoder = "mixed" if on_gpu else "cpu"
        if split == "train":
            images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                                   random_aspect_ratio=[0.8, 1.25], random_area=[0.1, 1.0],
                                                   num_attempts=100)
            images = fn.resize(images, resize_x=res, resize_y=res, interp_type=types.INTERP_TRIANGULAR)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
            images = fn.resize(images, size=test_resize(res), mode="not_smaller", interp_type=types.INTERP_TRIANGULAR)
            mirror = False
        images = fn.crop_mirror_normalize(images.gpu() if on_gpu else images, dtype=types.FLOAT, output_layout="HWC",
                                          crop=(res, res), mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                                          mirror=mirror)
        keys = (fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0),) if with_ids else ()
        return (images, labels.gpu() if on_gpu else labels) + keys

    pipe = graph()
    pipe.build()
    # DALIClassificationIterator is this iterator with outputs ["data", "label"]: the ids need a third
    batches = DALIGenericIterator(pipe, ["data", "label"] + (["keys"] if with_ids else []), reader_name="Reader",
                                  last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)

    def epochs():
        while True:
            yield ((b[0]["data"].permute(0, 3, 1, 2), b[0]["label"].squeeze(-1).long())
                   + ((_sample_ids(b[0]["keys"]),) if with_ids else ()) for b in batches)
    return Reference(epochs(), pipe.reader_meta("Reader")["epoch_size"])


def _sample_ids(keys):
    """Sample ids from DALI's source_info of webdataset samples ("<tar>:<offset>:<id>.jpg", zero-padded)."""
    return torch.tensor([int(bytes(k[k != 0].tolist()).decode().rsplit(":", 1)[1].split(".")[0]) for k in keys])


def ffcv_reference(data_dir, split, *, batch_size, res, device, seed, workers, with_ids=False):
    from ingest import layout
    from loaders.ffcv import SampleIdDecoder, keep_torch_threads
    with keep_torch_threads():
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline.pipeline_spec import PipelineSpec
        from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    train = split == "train"
    decoder = (RandomResizedCropRGBImageDecoder((res, res)) if train
               else CenterCropRGBImageDecoder((res, res), ratio=TEST_CROP_RATIO))
    pipelines = {  # ffcv-imagenet's, up to its NormalizeImage (see the module docstring)
        "image": [decoder] + ([RandomHorizontalFlip()] if train else []) + [ToTensor()] + to_device
                 + [ToTorchImage()],
        "label": [IntDecoder(), ToTensor(), Squeeze(1)] + to_device,  # Squeeze(): a last batch of 1 is 0-d
    }
    if with_ids:
        pipelines["id"] = PipelineSpec("label", decoder=SampleIdDecoder(), transforms=[ToTensor(), Squeeze(1)])
    with keep_torch_threads():
        loader = Loader(str(layout.beton_path(data_dir, split)), batch_size=batch_size,
                        num_workers=_threads(workers), order=OrderOption.QUASI_RANDOM if train else
                        OrderOption.SEQUENTIAL, os_cache=True, drop_last=False, pipelines=pipelines, seed=seed)
    normalize = Normalizer(device)  # the ffcv backend's step, in the timed loop

    def epochs():
        while True:
            with keep_torch_threads():
                batches = iter(loader)
            yield ((normalize(images), labels, *ids) for images, labels, *ids in batches)
    return Reference(epochs(), len(loader.indices))


def _dali_epochs(batches, *names):
    """Epochs of a DALI iterator with auto_reset, each an iterator of tuples of its outputs `names`."""
    while True:
        yield (tuple(b[0][n] for n in names) for b in batches)


class Reference:
    """A reference pipeline as a loader: each iteration is its next epoch; set_epoch is the library's business."""

    def __init__(self, epochs, num_samples):
        self.epochs, self.num_samples = epochs, num_samples

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        return next(self.epochs)


class DecodeOnly:
    """Every stored JPEG of the split decoded once per epoch by `decode(list of JPEG byte tensors)`, batch by
    batch, in `workers` threads; the images are dropped (a loader would still have to crop and normalise)."""

    def __init__(self, data_dir, split, *, batch_size, decode, workers):
        from ingest.shards import ShardIndex
        self.samples, self.batch_size, self.decode = ShardIndex(data_dir, split), batch_size, decode
        self.num_samples = len(self.samples)
        self.pool = ThreadPoolExecutor(_threads(workers))

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        for start in range(0, self.num_samples, self.batch_size):
            positions = range(start, min(start + self.batch_size, self.num_samples))
            jpegs = [torch.frombuffer(self.samples.read(p), dtype=torch.uint8) for p in positions]
            yield self.decode(self.pool, jpegs), torch.from_numpy(self.samples.labels[positions])


def decode_torchvision(data_dir, split, *, batch_size, res, device, seed, workers):
    from loaders.torch_loader import decode, decode_jpegs_on_gpu

    def decode_batch(pool, jpegs):
        return decode_jpegs_on_gpu(jpegs, device) if device.type == "cuda" else list(pool.map(decode, jpegs))
    return DecodeOnly(data_dir, split, batch_size=batch_size, decode=decode_batch, workers=workers)


def decode_pil(data_dir, split, *, batch_size, res, device, seed, workers):
    from PIL import Image
    short = test_resize(res)

    def one(jpeg):
        image = Image.open(io.BytesIO(jpeg.numpy().tobytes()))
        image.draft("RGB", (short, short))  # the largest DCT scale-down that keeps both sides >= short
        image.load()
        return image.size

    return DecodeOnly(data_dir, split, batch_size=batch_size, decode=lambda pool, jpegs: list(pool.map(one, jpegs)),
                      workers=workers)


def decode_dali(data_dir, split, *, batch_size, res, device, seed, workers):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from ingest import layout
    tars, indexes = layout.shard_paths(data_dir, split)
    on_gpu = device.type == "cuda"

    @pipeline_def(batch_size=batch_size, num_threads=_threads(workers), device_id=(device.index or 0) if on_gpu else None)
    def graph():
        jpegs, labels = fn.readers.webdataset(paths=[str(t) for t in tars], index_paths=[str(i) for i in indexes],
                                              ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT64],
                                              pad_last_batch=True, name="Reader")
        images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
        return images.shape(), labels  # the images stay in DALI's buffers

    pipe = graph()
    pipe.build()
    batches = DALIGenericIterator(pipe, ["shapes", "labels"], reader_name="Reader",
                                  last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
    return Reference(_dali_epochs(batches, "shapes", "labels"), pipe.reader_meta("Reader")["epoch_size"])


LIBRARY = {"dali-reference": "loaders.dali", "ffcv-reference": "loaders.ffcv",  # imported before the build is timed
           "decode-torchvision": "loaders.torch_loader", "decode-pil": "loaders.torch_loader",
           "decode-dali": "loaders.dali"}
REFERENCES = {"dali": "dali-reference", "ffcv": "ffcv-reference"}  # backend -> its library's own pipeline
DECODERS = ("decode-torchvision", "decode-pil", "decode-dali")
ROWS = {"dali-reference": dali_reference, "ffcv-reference": ffcv_reference, "decode-torchvision": decode_torchvision,
        "decode-pil": decode_pil, "decode-dali": decode_dali}
