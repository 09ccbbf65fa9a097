"""Joins the JSON rows of `kstyle bench [--model]`, scripts/bench_torch*.py and candle-cuda-bench (one file,
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
            base[who][key(r["name"])] = r
    fmt = lambda v: f"{v:>10.3f}" if v is not None else f"{'-':>10}"
    ratio = lambda b, k: f"{b / k:>8.2f}" if b is not None else f"{'-':>8}"
    print(f"{'case':<46} {'kstyle ms':>10} {'torch ms':>10} {'candle ms':>10} {'torch/k':>8} "
          f"{'candle/k':>8}  peak MiB kstyle / torch")
    for r in rows:
        if r["name"].split()[0] in base:
            continue
        k = key(r["name"])
        t, c = base["torch"].get(k, {}), base["candle"].get(k, {})
        tm, cm = t.get("ms"), c.get("ms")
        peaks = ""
        if "peak_mib" in r:
            tp = t.get("peak_mib")
            peaks = f"  {r['peak_mib']:.0f} / {tp:.0f}" if tp is not None else f"  {r['peak_mib']:.0f} / -"
        print(f"{r['name']:<46} {r['ms']:>10.3f} {fmt(tm)} {fmt(cm)} {ratio(tm, r['ms'])} "
              f"{ratio(cm, r['ms'])}{peaks}")


if __name__ == "__main__":
    main()
