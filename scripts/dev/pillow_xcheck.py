# Throwaway cross-check of src/image/resample.rs against Pillow (the Rust code is not derived from
# this). Inputs come from a 64-bit LCG both sides can reproduce; outputs are compared by FNV-1a 64.
# usage: python pillow_xcheck.py OUT.json [N_RANDOM] [--box | --blur]
# With --box every random case resizes a region of the source (`Image.resize(size, f, box=...)`):
# whole-pixel, quarter-pixel and zero-extent boxes (what diffusers' "fill" resize uses).
# With --blur every random case is `im.filter(ImageFilter.GaussianBlur(radius))` instead (what
# diffusers' `VaeImageProcessor.blur` runs): whole, fractional and large radii; ow, oh unused.
import json, random, sys

from sweep_hash import fnv1a, lcg_bytes
from PIL import Image, ImageFilter

FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}

def case(w, h, c, ow, oh, f, box=None):
    seed = w * 1_000_003 + h * 1009 + ow * 31 + oh + c
    mode = {1: "L", 3: "RGB"}[c]
    im = Image.frombytes(mode, (w, h), lcg_bytes(w * h * c, seed))
    out = im.resize((ow, oh), FILTERS[f], box=box).tobytes()
    row = dict(w=w, h=h, c=c, ow=ow, oh=oh, filter=f, seed=seed, fnv=f"{fnv1a(out):016x}")
    if box is not None:
        row["box"] = list(box)
    return row

def blur_case(w, h, c, radius):
    seed = w * 1_000_003 + h * 1009 + c
    mode = {1: "L", 3: "RGB"}[c]
    im = Image.frombytes(mode, (w, h), lcg_bytes(w * h * c, seed))
    out = im.filter(ImageFilter.GaussianBlur(radius)).tobytes()
    return dict(w=w, h=h, c=c, radius=radius, seed=seed, fnv=f"{fnv1a(out):016x}")

def random_span(rng, size):
    """A [a, b] inside [0, size]: whole pixels, quarter pixels, or zero extent at some point."""
    kind = rng.choice(["whole", "quarter", "empty"])
    if kind == "empty":
        a = rng.choice([0, size, rng.randint(0, size)])
        return a, a
    if kind == "whole":
        a = rng.randint(0, size - 1)
        return a, rng.randint(a + 1, size)
    a = rng.randint(0, size * 4 - 1)
    return a / 4, rng.randint(a + 1, size * 4) / 4

fixed = [(128, 128, 3, 64, 64, "bicubic"), (80, 96, 3, 64, 76, "bicubic"), (96, 80, 3, 76, 64, "bicubic"),
         (7, 5, 3, 19, 13, "bicubic"), (5, 7, 1, 2, 3, "bicubic"), (1, 1, 3, 4, 3, "bicubic"),
         (33, 17, 3, 33, 5, "bicubic"), (17, 33, 3, 4, 33, "bicubic"), (300, 200, 3, 64, 42, "bicubic"),
         (64, 48, 3, 224, 168, "bicubic"), (37, 23, 3, 11, 29, "bicubic"), (2, 2, 3, 1, 1, "bicubic"),
         (100, 3, 3, 7, 1, "bicubic"), (40, 30, 3, 17, 13, "bilinear"), (13, 9, 3, 40, 27, "bilinear"),
         (40, 30, 3, 17, 13, "lanczos"), (13, 9, 1, 40, 27, "lanczos"), (250, 250, 3, 224, 224, "bicubic"),
         # Pillow 13 goes vertical first here (height shrinks > 2x the pixels the width does) ...
         (100, 300, 3, 64, 192, "bicubic"), (22, 122, 3, 5, 75, "bicubic"), (60, 60, 1, 33, 5, "bicubic"),
         (16, 159, 3, 53, 128, "bilinear"), (90, 40, 3, 74, 7, "lanczos"),
         # ... and horizontal first on the boundary.
         (60, 60, 1, 33, 6, "bicubic"), (90, 40, 3, 74, 8, "lanczos"), (100, 200, 3, 64, 128, "bicubic")]
boxes, blurs = "--box" in sys.argv, "--blur" in sys.argv
args = [a for a in sys.argv[1:] if a not in ("--box", "--blur")]
cases = [] if boxes or blurs else [case(*a) for a in fixed]
rng = random.Random(13 if blurs else 11 if boxes else 7)
for _ in range(int(args[1]) if len(args) > 1 and blurs else 0):
    radius = rng.choice([0, 0.5, 1, 2, 4, 33, round(rng.uniform(0, 20), 3), round(rng.uniform(0, 3), 3)])
    cases.append(blur_case(rng.randint(1, 120), rng.randint(1, 120), rng.choice([1, 3]), radius))
for _ in range(int(args[1]) if len(args) > 1 and not blurs else 0):
    w, h = rng.randint(1, 160), rng.randint(1, 160)
    ow, oh = rng.randint(1, 200), rng.randint(1, 200)
    box = None
    if boxes:
        (x0, x1), (y0, y1) = random_span(rng, w), random_span(rng, h)
        box = (x0, y0, x1, y1)
    cases.append(case(w, h, rng.choice([1, 3]), ow, oh, rng.choice(list(FILTERS)), box))
json.dump(cases, open(args[0], "w"), indent=0)
print(len(cases), "cases")
