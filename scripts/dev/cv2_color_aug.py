# Throwaway cross-check of src/image/color_aug.rs against OpenCV as kohya's `color_aug` calls it
# (sd-scripts library/train_util.py, AugHelper.color_aug; the Rust code is not derived from this).
# Each case runs one of kohya's two transforms on an RGB picture held as numpy uint8, exactly as
# kohya writes them, with the draw given instead of drawn:
#   hue:   hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV) (kohya's RGB array read as BGR);
#          hsv[:, :, 0] = (hsv[:, :, 0] + shift) % 180   (shift in [0, 8] or [172, 180));
#          img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
#   gamma: img = np.clip(img ** gamma, 0, 255).astype(np.uint8)   (numpy >= 2: float64)
# Inputs come from the 64-bit LCG of pillow_xcheck.py; outputs are compared by FNV-1a 64. Widths
# that are not multiples of 32 send each row's last pixels through OpenCV's scalar path, whose
# rounding differs from its vector path's (x86 AVX2 dispatch: 32 pixels a block).
# usage: python cv2_color_aug.py OUT.json [N_RANDOM]   (opencv-python-headless 4.10, numpy 2.2;
# under numpy 1.26 on an AVX-512 machine the five gamma-1.0 cases differ: its vectorised power
# gives 50.99999999999999 for 51 ** 1.0, truncated to 50)
import json, random, sys

from sweep_hash import fnv1a, lcg_bytes
import cv2
import numpy as np


def case(w, h, kind, value):
    seed = w * 1_000_003 + h * 1009 + int(value * 1000)
    img = np.frombuffer(lcg_bytes(w * h * 3, seed), np.uint8).reshape(h, w, 3).copy()
    if kind == "hue":
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0] + value) % 180
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    else:
        out = np.clip(img ** value, 0, 255).astype(np.uint8)
    return dict(w=w, h=h, kind=kind, value=value, seed=seed, fnv=f"{fnv1a(out.tobytes()):016x}")

def main():
    out_path = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    rows = []
    # Hue shifts at the ends of kohya's ranges, gammas at theirs; widths with and without a tail.
    for w, h in [(32, 8), (64, 4), (37, 5), (1, 3), (31, 2), (100, 3)]:
        for shift in [0.0, 0.5, 3.7, 7.999, 8.0, 172.0, 172.25, 179.9]:
            rows.append(case(w, h, "hue", shift))
        for gamma in [0.95, 0.97, 1.0, 1.03, 1.05]:
            rows.append(case(w, h, "gamma", gamma))
    rnd = random.Random(20261204)
    for _ in range(n):
        w, h = rnd.randint(1, 130), rnd.randint(1, 9)
        if rnd.random() < 0.6:
            shift = rnd.uniform(-8, 8)
            rows.append(case(w, h, "hue", round(shift + 180 if shift < 0 else shift, 6)))
        else:
            rows.append(case(w, h, "gamma", round(rnd.uniform(0.95, 1.05), 6)))
    json.dump(dict(opencv=cv2.__version__, numpy=np.__version__, cases=rows), open(out_path, "w"), indent=0)
    print(len(rows), "cases ->", out_path)

main()
