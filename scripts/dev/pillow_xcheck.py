# Throwaway cross-check of src/image/resample.rs against Pillow (the Rust code is not derived from
# this). Inputs come from a 64-bit LCG both sides can reproduce; outputs are compared by FNV-1a 64.
# usage: python pillow_xcheck.py OUT.json [N_RANDOM]
import json, random, sys
from PIL import Image

FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}
M = (1 << 64) - 1

def lcg_bytes(n, seed):
    x, out = seed & M, bytearray(n)
    for i in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & M
        out[i] = (x >> 33) & 0xFF
    return bytes(out)

def fnv1a(b):
    h = 0xcbf29ce484222325
    for v in b:
        h = ((h ^ v) * 0x100000001b3) & M
    return h

def case(w, h, c, ow, oh, f):
    seed = w * 1_000_003 + h * 1009 + ow * 31 + oh + c
    mode = {1: "L", 3: "RGB"}[c]
    im = Image.frombytes(mode, (w, h), lcg_bytes(w * h * c, seed))
    out = im.resize((ow, oh), FILTERS[f]).tobytes()
    return dict(w=w, h=h, c=c, ow=ow, oh=oh, filter=f, seed=seed, fnv=f"{fnv1a(out):016x}")

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
cases = [case(*a) for a in fixed]
rng = random.Random(7)
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 0):
    w, h = rng.randint(1, 160), rng.randint(1, 160)
    ow, oh = rng.randint(1, 200), rng.randint(1, 200)
    cases.append(case(w, h, rng.choice([1, 3]), ow, oh, rng.choice(list(FILTERS))))
json.dump(cases, open(sys.argv[1], "w"), indent=0)
print(len(cases), "cases")
