"""Joins the JSON rows of `kstyle bench`, scripts/bench_torch.py and candle-cuda-bench (one file,
as scripts/gpu-check.sh gathers them) into one table: a row per kstyle case with the baselines on
the same shape beside it. Names match once the `torch `/`candle ` prefix and the attention kernel
word (`flash`/`composed`: PyTorch picks its own, candle has only the composition) are dropped.

Usage: python3 scripts/bench_join.py bench.jsonl
"""
import json
import sys


def key(name):
    words = name.split()
    if words and words[0] in ("torch", "candle"):
        words = words[1:]
    return " ".join(w for w in words if w not in ("flash", "composed"))


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    base = {"torch": {}, "candle": {}}
    for r in rows:
        who = r["name"].split()[0]
        if who in base:
            base[who][key(r["name"])] = r["ms"]
    print(f"{'case':<46} {'kstyle ms':>10} {'torch ms':>10} {'candle ms':>10} {'candle/kstyle':>14}")
    for r in rows:
        if r["name"].split()[0] in base:
            continue
        k = key(r["name"])
        t, c = base["torch"].get(k), base["candle"].get(k)
        fmt = lambda v: f"{v:>10.3f}" if v is not None else f"{'-':>10}"
        ratio = f"{c / r['ms']:>14.2f}" if c is not None else f"{'-':>14}"
        print(f"{r['name']:<46} {r['ms']:>10.3f} {fmt(t)} {fmt(c)} {ratio}")


if __name__ == "__main__":
    main()
