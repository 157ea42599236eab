"""A 500px-like demo dataset, generated deterministically, because the real 500px photos are not ours to ship.

Each of the 28 categories gets a fixed visual recipe (palette, texture, shapes) drawn from its name; every
photo varies it (jitter, noise, a distractor texture from another class), so a small CNN learns it but
cannot be perfect. People/Celebrities and Landscapes/Travel share a recipe up to a small shift, like the
confusable pairs of the study. Sizes, aspect ratios, JPEG qualities and progressive encoding vary, and a
scraped folder's junk is sprinkled in: grayscale, CMYK, PNG-with-alpha named .jpg, EXIF-rotated, a within-
class and a cross-class duplicate, one truncated JPEG, one empty file, one non-image and a hidden file.

`.demo.json` (hidden, so ingest ignores it) is written last: it marks a complete folder and says which file
is which kind of junk, for the tests. `python ingest/demo.py --out DIR [--per-class N] [--seed S]`.
"""
import hashlib
import io
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

if __name__ == "__main__" and not __package__:  # run by its path: import from the repo root, not ingest/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from cli import Parser, UsageError, run  # noqa: E402
from files import one_writer, read_json, write_bytes, write_json  # noqa: E402
from ingest import layout  # noqa: E402
from ingest.children import process_pool  # noqa: E402

CLASSES = ("Abstract", "Animals", "Black and White", "Celebrities", "City and Architecture", "Commercial",
           "Concert", "Family", "Fashion", "Film", "Fine Art", "Food", "Journalism", "Landscapes", "Macro",
           "Nature", "Night", "People", "Performing Arts", "Sport", "Still Life", "Street", "Transportation",
           "Travel", "Underwater", "Urban Exploration", "Wedding", "Aerial")
CONFUSABLE = {"Celebrities": "People", "Travel": "Landscapes"}  # class -> the class whose recipe it shifts
MARKER = ".demo.json"
CANVAS = 96  # long side the texture is drawn at; upscaling to photo size is PIL's (C) work, not numpy's
EXIF_ORIENTATION = 0x0112
GRAIN_SIGMA = (3.0, 14.0)  # per-photo grain strength (uint8 levels at half resolution): mean ~0.18 bytes/pixel
QUALITY_BANDS = ((60, 74), (75, 89), (90, 97))  # JPEG quality bands, drawn with QUALITY_SHARES
QUALITY_SHARES = (0.2, 0.55, 0.25)
PROGRESSIVE_SHARE = 0.25  # of web JPEGs, about a quarter are progressive


@dataclass(frozen=True)
class DemoConfig:
    per_class: int = 50  # images per class: ~1,400 in all, a CPU demo in minutes (the study had ~1,000)
    seed: int = 0
    long_side: tuple = (300, 1500)  # px, drawn uniformly per photo; aspect ratio 3:4 .. 16:9, either way up
    classes: tuple = CLASSES
    junk: bool = True  # sprinkle the junk a scraped folder holds


def _rng(*keys):
    """A generator seeded from strings/ints, so a class's recipe depends on its name only."""
    digest = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _recipe(name):
    base = CONFUSABLE.get(name, name)
    rng = _rng("recipe", base)
    recipe = {
        "palette": rng.uniform(0, 255, (3, 3)),
        "kind": int(rng.integers(5)),  # stripes, rings, checker, waves, blobs
        "freq": rng.uniform(2, 9),
        "angle": rng.uniform(0, np.pi),
        "shapes": int(rng.integers(0, 6)),
        "gray": name == "Black and White",
    }
    if name in CONFUSABLE:  # the same look, slightly shifted: separable, but only just
        recipe["freq"] *= 1.25
        recipe["palette"] = np.clip(recipe["palette"] + [[18, -12, 10]], 0, 255)
    return recipe


def _texture(recipe, h, w, rng):
    """Pattern value in [0, 1] on an h x w grid."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    angle = recipe["angle"] + rng.normal(0, 0.3)
    freq = recipe["freq"] * rng.uniform(0.8, 1.2)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    phase = rng.uniform(0, 2 * np.pi)
    kind = recipe["kind"]
    if kind == 0:
        t = np.sin(2 * np.pi * freq * u + phase)
    elif kind == 1:
        cy, cx = rng.uniform(0.2, 0.8, 2)
        t = np.sin(2 * np.pi * freq * np.hypot(x - cx, y - cy) + phase)
    elif kind == 2:
        t = np.sign(np.sin(2 * np.pi * freq * u + phase) * np.sin(2 * np.pi * freq * v))
    elif kind == 3:
        t = np.sin(2 * np.pi * freq * u + 2 * np.sin(2 * np.pi * freq / 2 * v) + phase)
    else:
        t = np.zeros_like(u)
        for cy, cx in rng.uniform(0, 1, (int(freq), 2)):
            t += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) * freq * 20)
        t = 2 * np.clip(t, 0, 1) - 1
    return (t + 1) / 2


def _draw(name, h, w, rng, all_classes):
    """One photo-like RGB array: class texture, class shapes, a distractor texture, jitter and noise."""
    recipe = _recipe(name)
    palette = recipe["palette"] + rng.normal(0, 20, (3, 3))
    t = _texture(recipe, h, w, rng)[..., None]
    img = palette[0] * (1 - t) + palette[1] * t
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    for _ in range(recipe["shapes"]):
        cy, cx = rng.uniform(0, 1, 2) * (h / max(h, w), w / max(h, w))
        r = rng.uniform(0.05, 0.2)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = palette[2]
    other = all_classes[int(rng.integers(len(all_classes)))]
    if rng.random() < 0.4:  # a distractor: what keeps a CNN from 100 %
        alpha = rng.uniform(0.2, 0.6)
        o = _recipe(other)
        ot = _texture(o, h, w, rng)[..., None]
        img = (1 - alpha) * img + alpha * (o["palette"][0] * (1 - ot) + o["palette"][1] * ot)
    img = img * rng.uniform(0.6, 1.3) + rng.normal(0, 12, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if recipe["gray"]:
        img = np.repeat(img.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
    return img


def _photo(cfg, name, index):
    """(PIL image at photo size, jpeg quality, progressive) for photo `index` of class `name`."""
    rng = _rng("photo", cfg.seed, name, index)
    long_side = int(rng.integers(cfg.long_side[0], cfg.long_side[1] + 1))
    aspect = rng.uniform(4 / 3, 16 / 9) if rng.random() < 0.8 else 1.0
    short_side = max(1, round(long_side / aspect))
    w, h = (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)
    scale = CANVAS / max(w, h)
    small = _draw(name, max(8, round(h * scale)), max(8, round(w * scale)), rng, cfg.classes)
    image = _grain(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), rng)
    return image, _quality(rng), bool(rng.random() < PROGRESSIVE_SHARE)


def _grain(image, rng):
    """Fine detail at photo size: an upscaled smooth canvas alone compresses to ~0.1 bytes/pixel and decodes
    faster than a real photo (~0.18), so add grain at half the photo's resolution, its strength varying per
    photo like the detail of real scenes. PIL does the upscale; numpy draws one half-size field."""
    w, h = image.size
    field = rng.standard_normal((max(8, h // 2), max(8, w // 2), 3), dtype=np.float32)
    field *= rng.uniform(*GRAIN_SIGMA)
    field = Image.fromarray(np.clip(field + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, np.int16) + np.asarray(field, np.int16) - 128
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _quality(rng):
    """A JPEG quality like the web's: mostly 75-89 (CMS exports), a fifth re-saved low (60-74), a quarter 90-97."""
    low, high = QUALITY_BANDS[int(rng.choice(len(QUALITY_BANDS), p=QUALITY_SHARES))]
    return int(rng.integers(low, high + 1))


def _write_photo(job):
    """Worker: render and save one photo (atomically); returns its path."""
    cfg, name, index, path, variant = job
    image, quality, progressive = _photo(cfg, name, index)
    buf = io.BytesIO()
    if variant == "gray":
        image.convert("L").save(buf, "JPEG", quality=quality)
    elif variant == "cmyk":
        image.convert("CMYK").save(buf, "JPEG", quality=quality)
    elif variant == "png_alpha":  # a PNG with transparency, misnamed .jpg
        rgba = image.convert("RGBA")
        alpha = np.full((image.height, image.width), 255, np.uint8)
        alpha[: image.height // 3] = 0
        rgba.putalpha(Image.fromarray(alpha))
        rgba.save(buf, "PNG")
    elif variant == "exif_rotated":  # pixels stored rotated; the EXIF tag says how to turn them upright
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6  # "rotate 90 CW to view": stored = upright rotated 90 CCW
        image.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=quality, exif=exif)
    else:
        image.save(buf, "JPEG", quality=quality, progressive=progressive or variant == "progressive")
    write_bytes(path, buf.getvalue(), durable=False)  # not flushed (files.py): ingest checks every photo anyway
    return path


def _variant(k, variants):
    """The odd format of photo k overall: each variant once among the first photos (every other one, so
    even a tiny demo has them all), then about 1 photo in 25."""
    if not variants:
        return None
    if k < 2 * len(variants):
        return variants[k // 2] if k % 2 == 0 else None
    return variants[k % len(variants)] if k % 25 == 12 else None


def _plan(cfg, out):
    """Every photo to render as (cfg, class, index, path, variant), plus the junk kinds by relative path."""
    variants = ["gray", "cmyk", "png_alpha", "exif_rotated", "progressive"] if cfg.junk else []
    jobs, junk = [], {}
    for c, name in enumerate(cfg.classes):
        for i in range(cfg.per_class):
            variant = _variant(c * cfg.per_class + i, variants)
            path = out / name / f"{i:05d}.jpg"
            jobs.append((cfg, name, i, path, variant))
            if variant:
                junk.setdefault(variant, []).append(f"{name}/{path.name}")
    return jobs, junk


def _sprinkle_junk(cfg, out, junk):
    """The files a scraper leaves behind, each named like a photo."""
    first, second = cfg.classes[0], cfg.classes[1]
    n = cfg.per_class
    photo = (out / first / f"{0:05d}.jpg").read_bytes()
    files = {
        "truncated": (f"{first}/{n:05d}.jpg", photo[: len(photo) // 2]),
        "empty": (f"{first}/{n + 1:05d}.jpg", b""),
        "not_an_image": (f"{second}/{n:05d}.jpg", b"<html><body>404 Not Found</body></html>\n"),
        "duplicate": (f"{first}/{n + 2:05d}.jpg", (out / first / f"{1:05d}.jpg").read_bytes()),
        "cross_class": (f"{second}/{n + 1:05d}.jpg", (out / first / f"{3:05d}.jpg").read_bytes()),
        "hidden": (f"{second}/.DS_Store", b"\0\0\0\1Bud1"),
    }
    for kind, (rel, data) in files.items():
        write_bytes(out / rel, data, durable=False)
        junk[kind] = [rel]
    junk["duplicate"].insert(0, f"{first}/{1:05d}.jpg")  # the original first, then its copy
    junk["cross_class"].insert(0, f"{first}/{3:05d}.jpg")


def generate(out, cfg=DemoConfig(), workers=None, progress=True):
    """Write the demo into `out` unless a complete one with the same config is already there; returns the
    marker's content ({config, junk: {kind: [relative paths]}})."""
    out = Path(out)
    # Two first runs in one tree: one generates, the other waits (saying for whom), then finds it done. The lock
    # is a sibling folder, so the demo folder holds nothing but photos for ingest to scan.
    with one_writer(out.with_name(f".{out.name}.lock"), wait=True):
        return _generate(out, cfg, workers, progress)


def _generate(out, cfg, workers, progress):
    marker = out / MARKER
    if marker.is_file():
        done = read_json(marker)
        if done["config"] == json.loads(json.dumps(asdict(cfg))):
            return done
        raise UsageError(f"{out} holds a demo made with other settings: delete it or choose another --out")
    if cfg.per_class < 3 or not 0 < cfg.long_side[0] <= cfg.long_side[1] or not cfg.classes:
        raise UsageError("the demo needs --per-class >= 3, 0 < min long side <= max long side and classes")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty and holds no complete demo: delete it or choose another --out")
    for name in cfg.classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    jobs, junk = _plan(cfg, out)
    workers = workers or len(os.sched_getaffinity(0))
    with process_pool(workers, "the demo") as pool:
        bar = tqdm(pool.map(_write_photo, jobs, chunksize=8), total=len(jobs), desc="demo", unit="img",
                   disable=not progress)
        for _ in bar:
            pass
    if cfg.junk:
        _sprinkle_junk(cfg, out, junk)
    done = {"config": json.loads(json.dumps(asdict(cfg))), "junk": junk}
    write_json(marker, done, indent=1)
    return done


def main(argv=None):
    p = Parser(prog="python ingest/demo.py", description="Generate the 500px-like demo photos (28 classes).")
    p.add_argument("--out", type=Path, default=layout.DEFAULT_SRC, help="folder to create")
    p.add_argument("--per-class", type=int, default=DemoConfig.per_class, help="photos per class")
    p.add_argument("--seed", type=int, default=DemoConfig.seed, help="same seed, same photos")
    p.add_argument("--long-side", type=int, nargs=2, default=DemoConfig.long_side, metavar=("MIN", "MAX"),
                   help="range of the photos' long side in px")
    args = p.parse_args(argv)
    cfg = DemoConfig(per_class=args.per_class, seed=args.seed, long_side=tuple(args.long_side))
    generate(args.out, cfg)
    print(f"demo: {len(cfg.classes)} classes x {cfg.per_class} photos (+ junk) in {args.out}")


if __name__ == "__main__":
    run(main)
