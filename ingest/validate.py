"""Turn one source file into either a normalised baseline JPEG or a quarantine reason, in a worker process.

Every accepted image is fully decoded, made RGB (gray, CMYK, palette; alpha composited on white), turned
upright from its EXIF orientation, shrunk so its shorter side is the store size (never enlarged) and
re-encoded once as baseline JPEG, which every decoder we feed (DALI CPU and nvJPEG hardware, FFCV's
libjpeg-turbo, PIL) accepts. The result lands in a checked cache keyed by the file's content hash and the
parameters (ingest/cache.py), so a killed or repeated run never redoes a file.
"""
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

from ingest import cache

Image.MAX_IMAGE_PIXELS = None  # our own --max-pixels check below replaces PIL's fixed limit
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode to grey


@dataclass(frozen=True)
class Checked:
    rel: str
    label: int
    sha256: str  # of the source file's bytes: what duplicates are found by
    reason: str = ""  # empty = accepted
    width: int = 0  # of the stored image
    height: int = 0
    cached: str = ""  # cache entry holding the stored JPEG (or the reason), see ingest/cache.py
    stored_bytes: int = 0  # of the stored JPEG


class Rejected(Exception):
    """A file that must not reach a shard; the message is its quarantine reason."""


def check(task):
    """Worker entry point: task = (cfg, rel, label) -> Checked. A cached result is reused if its entry is whole
    and was made from these very source bytes; any other is made again."""
    cfg, rel, label = task
    try:
        data = read_source(cfg.src / rel)
    except Rejected as why:
        return Checked(rel, label, "", reason=str(why))
    sha = hashlib.sha256(data).hexdigest()
    path = cache.entry_path(cfg.cache_dir, sha, cfg.cache_params())
    entry = cache.read(path, sha)
    if entry is None:
        try:
            encoded, size = normalise(data, cfg)
            entry = cache.Entry("jpeg", encoded, *size)
        except Rejected as why:
            entry = cache.Entry("rejected", str(why).encode())
        cache.write(path, sha, entry)
    if entry.kind == "rejected":
        return Checked(rel, label, sha, reason=entry.payload.decode(errors="replace"), cached=str(path))
    return Checked(rel, label, sha, width=entry.width, height=entry.height, cached=str(path),
                   stored_bytes=len(entry.payload))


def read_source(path):
    """A source file's bytes, or Rejected: removed or locked since it was found is a reason, not a crash."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise Rejected(f"unreadable: {err.strerror}") from None


def normalise(data, cfg):
    """Source bytes -> (baseline JPEG bytes, (width, height)), or Rejected with the reason."""
    image = stored_photo(data, cfg)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=cfg.quality, progressive=False, optimize=False)  # no EXIF: already upright
    return out.getvalue(), image.size


def stored_photo(data, cfg):
    """Source bytes -> the RGB, upright photo at store size that ingest encodes (and predict.py classifies),
    or Rejected with the reason. cfg: anything with store_size, min_side and max_pixels."""
    image = opened(data, cfg)
    # JPEG can decode at 1/2, 1/4, 1/8 scale for free; ask for no less than the store size on both sides
    image.draft("RGB", (cfg.store_size, cfg.store_size))
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy when already upright (most photos)
        image = _rgb(image)
    except Rejected:
        raise
    except OSError as err:
        reason = "truncated" if "truncated" in str(err) else "undecodable"
        raise Rejected(f"{reason}: {err}") from None
    except Exception as err:  # corrupt data surfaces as many exception types inside the decoders
        raise Rejected(f"undecodable: {err}") from None
    return _shrink(image, cfg.store_size)


def opened(data, cfg):
    """Source bytes -> a PIL image whose header passed the checks that need no decoding, or Rejected."""
    if not data:
        raise Rejected("empty file")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise Rejected("not an image") from None
    except Exception as err:  # a header PIL recognises but cannot parse
        raise Rejected(f"undecodable: {err}") from None
    w, h = image.size
    if w * h > cfg.max_pixels:
        raise Rejected(f"decompression bomb: {w}x{h} = {w * h} pixels > --max-pixels {cfg.max_pixels}")
    if min(w, h) < cfg.min_side:
        raise Rejected(f"too small: {w}x{h}, shorter side < --min-side {cfg.min_side}")
    return image


_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")  # composited on white
_EIGHT_BIT = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")  # convert("RGB") maps these right


def _rgb(image):
    """Any mode Pillow opens -> RGB by its real range, or Rejected saying why not: never a silently black or
    white image (convert("RGB") clips 16-bit, int32 and float pixels to 0..255)."""
    mode = image.mode
    if mode in _ALPHA or (mode == "P" and "transparency" in image.info):
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if mode.startswith("I;16"):  # 16-bit gray: convert("RGB") would clip, so scale to 8 bits first
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    elif mode in ("I", "F"):
        image = _gray_8bit(image)
    elif mode not in _EIGHT_BIT:
        raise Rejected(f"unsupported pixel mode {mode}")
    return image.convert("RGB") if image.mode != "RGB" else image


def _gray_8bit(image):
    """An int32 (I) or float (F) image -> mode L, scaled by the range its values are in: 0..255 or 0..65535,
    and for floats also 0..1. Other ranges are quarantined: no scale can be told from them."""
    import numpy as np

    mode, pixels = image.mode, np.asarray(image)
    if not np.isfinite(pixels).all():
        raise Rejected(f"pixel mode {mode} with NaN or infinite values")
    low, high = pixels.min(), pixels.max()
    ranges = (1.0, 255, 65535) if mode == "F" else (255, 65535)
    top = next((r for r in ranges if high <= r), None)
    if low < 0 or top is None:
        raise Rejected(f"pixel mode {mode} with values {_number(low)}..{_number(high)}: outside "
                       f"0..{ranges[-1]}, so the range of its pixels is unknown")
    return Image.fromarray(np.rint(pixels.astype(np.float64) * (255 / top)).astype(np.uint8), "L")


def _number(value):
    return int(value) if float(value).is_integer() else f"{value:g}"


def _shrink(image, store_size):
    w, h = image.size
    scale = store_size / min(w, h)
    if scale >= 1:
        return image
    size = (store_size, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), store_size)
    # antialiased bilinear, as torchvision's Resize: after draft() this shrinks by < 2x, where Lanczos would
    # cost 2.4x the time (the largest share of the per-image work) for no visible gain at training res
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)

