"""The demo's photos look like web JPEGs to a decoder (issue 20, item 1): real photos of 500-1,100 px compress
to ~0.18 bytes per pixel at mixed JPEG qualities, a quarter of them progressive. Smoother synthetic photos
decode faster than real ones and would flatter every speed figure. Checked on the written files."""
import io

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CLASSES
from ingest.demo import QUALITY_BANDS, DemoConfig, generate


def _quality_by_table():
    """PIL's luminance quantisation table for each quality 1..100, to read a file's quality back exactly."""
    tables = {}
    for q in range(1, 101):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "JPEG", quality=q)
        tables.setdefault(tuple(Image.open(buf).quantization[0]), q)
    return tables


@pytest.mark.slow
def test_demo_photos_have_web_like_sizes_qualities_and_progressive_share(tmp_path):
    cfg = DemoConfig(per_class=5, seed=3, long_side=(500, 1100), junk=False)
    generate(tmp_path / "src", cfg, workers=2, progress=False)
    tables = _quality_by_table()
    long_sides, bpp, qualities, progressive = [], [], [], []
    for path in sorted((tmp_path / "src").glob("*/*.jpg")):
        with Image.open(path) as im:
            long_sides.append(max(im.size))
            bpp.append(path.stat().st_size / (im.width * im.height))
            qualities.append(tables[tuple(im.quantization[0])])
            progressive.append(bool(im.info.get("progressive") or im.info.get("progression")))
    assert len(long_sides) == 28 * 5
    assert 500 <= min(long_sides) and max(long_sides) <= 1100 and np.std(long_sides) > 100  # spread, in range
    assert 0.16 <= sum(bpp) / len(bpp) <= 0.21, sum(bpp) / len(bpp)  # the old demo: ~0.09
    assert np.percentile(bpp, 90) > 1.8 * np.percentile(bpp, 10)  # plain and detailed scenes both
    assert min(qualities) < 70 and max(qualities) >= 90 and 75 <= np.median(qualities) <= 90
    assert 0.15 <= np.mean(progressive) <= 0.35


def test_each_photo_is_a_jpeg_of_the_drawn_size_at_a_quality_of_the_webs_bands(tmp_path):
    """The fast tier's check of the same files, on six photos: too few for the shares above."""
    cfg = DemoConfig(per_class=3, seed=3, long_side=(500, 1100), junk=False, classes=TINY_CLASSES[:2])
    generate(tmp_path / "src", cfg, workers=1, progress=False)
    tables = _quality_by_table()
    photos = sorted((tmp_path / "src").glob("*/*.jpg"))
    assert len(photos) == 6
    for path in photos:
        with Image.open(path) as im:
            assert im.format == "JPEG" and 500 <= max(im.size) <= 1100
            quality = tables[tuple(im.quantization[0])]
            assert any(lo <= quality <= hi for lo, hi in QUALITY_BANDS), (path, quality)
