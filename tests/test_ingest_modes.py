"""Every pixel mode Pillow opens is stored by its real range, or quarantined with the reason (issue 19,
item 11): never an all-black or all-white stored image from a valid photo."""
import io

import numpy as np
import pytest
from PIL import Image

from ingest.config import IngestConfig
from ingest.validate import Rejected, normalise

GRADIENT = np.linspace(0, 1, 96 * 128).reshape(96, 128)  # mean 0.5: a right conversion stores ~128


def saved(image, fmt):
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def stored_mean(data, tmp_path):
    encoded, _ = normalise(data, IngestConfig(src=tmp_path, out=tmp_path / "out", store_size=64, min_side=16))
    return np.asarray(Image.open(io.BytesIO(encoded)), np.float64).mean()


def rgb_gradient(mode):
    rgb = Image.fromarray(np.repeat((GRADIENT * 255).round().astype(np.uint8)[..., None], 3, axis=2), "RGB")
    return rgb.convert(mode)


SOURCES = {  # mode Pillow opens it as: the file's bytes
    "F (0..1)": lambda: saved(Image.fromarray(GRADIENT.astype(np.float32), "F"), "TIFF"),
    "F (0..255)": lambda: saved(Image.fromarray((GRADIENT * 255).astype(np.float32), "F"), "TIFF"),
    "I (16-bit values)": lambda: saved(Image.fromarray((GRADIENT * 65535).astype(np.int32), "I"), "TIFF"),
    "I (8-bit values)": lambda: saved(Image.fromarray((GRADIENT * 255).astype(np.int32), "I"), "TIFF"),
    "I;16 (PNG)": lambda: saved(Image.fromarray((GRADIENT * 65535).astype(np.uint16)), "PNG"),
    "I;16B (TIFF)": lambda: saved(Image.frombytes("I;16B", (128, 96), (GRADIENT * 65535).astype(">u2").tobytes()),
                                  "TIFF"),
    "L": lambda: saved(rgb_gradient("L"), "PNG"),
    "1": lambda: saved(rgb_gradient("L").point(lambda v: 255 * (v > 127)).convert("1"), "PNG"),
    "P": lambda: saved(rgb_gradient("P"), "PNG"),
    "CMYK": lambda: saved(rgb_gradient("CMYK"), "JPEG"),
    "LAB": lambda: saved(rgb_gradient("LAB"), "TIFF"),
    "YCbCr (TIFF)": lambda: saved(rgb_gradient("YCbCr"), "TIFF"),
    "LA": lambda: saved(rgb_gradient("LA"), "PNG"),
    "RGBA": lambda: saved(rgb_gradient("RGBA"), "PNG"),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_each_mode_is_stored_by_its_real_range(tmp_path, kind):
    """Before: the float TIFF was stored all black (mean 0), the int32 one holding 16-bit values almost all
    white (mean ~254)."""
    data = SOURCES[kind]()
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == kind.split()[0]  # the file opens in the mode the case is about
    assert stored_mean(data, tmp_path) == pytest.approx(127.5, abs=4)


UNKNOWN_RANGE = {
    "I with negative values": (Image.fromarray((GRADIENT * 2000 - 1000).astype(np.int32), "I"),
                               "pixel mode I with values -1000..1000: outside 0..65535"),
    "I beyond 16 bits": (Image.fromarray((GRADIENT * 2 ** 20).astype(np.int32), "I"),
                         "pixel mode I with values 0..1048576: outside 0..65535"),
    "F beyond 16 bits": (Image.fromarray((GRADIENT * 1e6).astype(np.float32), "F"),
                         "pixel mode F with values 0..1000000: outside 0..65535"),
    "F with NaN": (Image.fromarray(np.where(GRADIENT > 0.5, np.nan, GRADIENT).astype(np.float32), "F"),
                   "pixel mode F with NaN or infinite values"),
}


@pytest.mark.parametrize("kind", list(UNKNOWN_RANGE))
def test_a_mode_whose_range_cannot_be_told_is_quarantined_with_the_reason(tmp_path, kind):
    image, reason = UNKNOWN_RANGE[kind]
    with pytest.raises(Rejected, match=reason.replace("+", r"\+")):
        stored_mean(saved(image, "TIFF"), tmp_path)
