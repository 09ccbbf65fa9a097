"""PyTorch baselines for `kstyle bench`, on the same shapes, run in the same gpu-check call.

Times with CUDA events around `iters` calls after a warm-up; five samples, median. Prints rows in
the format of `kstyle bench` (ms, GB/s, TFLOP/s) and, with --json, one JSON object per row.
"""
import argparse
import json

import torch
import torch.nn.functional as F


def timed(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters / 1e3)
    return sorted(samples)[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bf = torch.bfloat16
    rows = []

    def report(name, secs, nbytes, flops):
        row = {"name": name, "ms": secs * 1e3, "gbps": nbytes / secs / 1e9, "tflops": flops / secs / 1e12}
        rows.append(row)
        print(f"{name:<46} {row['ms']:>9.3f} ms  {row['gbps']:>8.1f} GB/s  {row['tflops']:>7.1f} TFLOP/s")

    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    x = torch.randn(8192, 8192, device=dev, dtype=bf)
    report("torch gemm 8192^3 bf16", timed(lambda: x @ x), 3 * 2 * 8192**2, 2 * 8192**3)
    for m, k, n in [(4096, 4096, 4096), (8192, 640, 640), (8192, 5120, 1280)]:
        a = torch.randn(m, k, device=dev, dtype=bf)
        w = torch.randn(n, k, device=dev, dtype=bf)
        report(f"torch gemm {m}x{k}x{n} bf16 (x W^T)", timed(lambda: a @ w.t()), 2 * (m * k + k * n + m * n), 2 * m * k * n)
    # Linear with bias on kstyle's shapes (F.linear: cuBLASLt with the bias epilogue where it can).
    for m, k, n in [(8192, 640, 640), (8192, 1280, 5120), (8192, 5120, 1280), (154, 2048, 640)]:
        a = torch.randn(m, k, device=dev, dtype=bf)
        w = torch.randn(n, k, device=dev, dtype=bf)
        bias = torch.randn(n, device=dev, dtype=bf)
        with torch.no_grad():
            report(f"torch linear+bias {m}x{k}->{n} bf16", timed(lambda: F.linear(a, w, bias)),
                   2 * (m * k + k * n + m * n + n), 2 * m * k * n)
    # AdamW over 3,522 tensors of 4,096 f32 values, foreach (one multi-tensor launch per op) and
    # fused (torch's one-kernel AdamW), as kstyle's flat-buffer step is timed.
    ps = [torch.randn(4096, device=dev, requires_grad=True) for _ in range(3522)]
    for p in ps:
        p.grad = torch.randn_like(p)
    n_all = 3522 * 4096
    for kind in ("foreach", "fused"):
        opt = torch.optim.AdamW(ps, lr=1e-4, **{kind: True})
        report(f"torch adamw {kind} 3522 tensors {n_all} f32", timed(opt.step), 4 * 7 * n_all, 0)
    for bh, sq, skv in [(20, 4096, 4096), (20, 4096, 77), (40, 1024, 1024)]:
        d = 64
        q = torch.randn(1, bh, sq, d, device=dev, dtype=bf, requires_grad=True)
        k = torch.randn(1, bh, skv, d, device=dev, dtype=bf, requires_grad=True)
        v = torch.randn(1, bh, skv, d, device=dev, dtype=bf, requires_grad=True)
        do = torch.randn(1, bh, sq, d, device=dev, dtype=bf)
        fl = 4 * bh * sq * skv * d
        io = 2 * (2 * bh * sq * d + 2 * bh * skv * d)
        with torch.no_grad():
            report(f"torch sdpa fwd bh{bh} {sq}x{skv} d{d} bf16", timed(lambda: F.scaled_dot_product_attention(q, k, v)), io, fl)

        def fwd_bwd():
            o = F.scaled_dot_product_attention(q, k, v)
            torch.autograd.grad(o, (q, k, v), do)

        report(f"torch sdpa fwd+bwd bh{bh} {sq}x{skv} d{d} bf16", timed(fwd_bwd), 2 * io, 3.5 * fl)
    xg = torch.randn(2, 320, 128, 128, device=dev, dtype=bf)
    w = torch.ones(320, device=dev, dtype=bf)
    b = torch.zeros(320, device=dev, dtype=bf)
    nbytes = 2 * xg.numel() * 2
    report("torch group_norm fwd 2x320x128x128 bf16", timed(lambda: F.group_norm(xg, 32, w, b, 1e-5)), nbytes, 0)
    report("torch group_norm+silu 2x320x128x128 bf16", timed(lambda: F.silu(F.group_norm(xg, 32, w, b, 1e-5))), nbytes, 0)
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
