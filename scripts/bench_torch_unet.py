"""The PyTorch baseline of `kstyle bench --model`: diffusers' UNet2DConditionModel built from the
full-size SDXL base config with random weights, bf16, its default attention (SDPA), on the shapes
kstyle times: inference at PX x PX with batch 2 (the CFG pair), and one training micro-batch
(batch 1, forward + backward) with peft LoRA rank 4 on to_q/to_k/to_v/to_out.0 (what diffusers'
SDXL LoRA script trains), without and with diffusers' gradient checkpointing. Peak memory is
torch.cuda.max_memory_allocated over one run of the case, weights included.

Row names match kstyle's once the `torch ` prefix is dropped (scripts/bench_join.py).
Needs diffusers (gpu-prepare.sh carries it as gpu-carry/diffusers.tar.xz) and peft (in the image).

Usage: python3 scripts/bench_torch_unet.py UNET_CONFIG_JSON [--px 1024] [--reps 5] [--json FILE]
       [--device cpu]   (a dry run of the script itself, e.g. on the tiny config at --px 32)
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps):
    fn()
    sync()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t)
    samples.sort()
    return samples[len(samples) // 2]


def peak_of(fn):
    """Peak bytes allocated while `fn` runs (0 off CUDA: the CPU run only checks the script)."""
    if not torch.cuda.is_available():
        fn()
        return 0
    sync()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--px", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script on a small config")
    args = ap.parse_args()
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    dev = torch.device(args.device)
    bf = torch.bfloat16
    rows = []

    def report(name, secs, peak):
        row = {"name": name, "ms": secs * 1e3, "peak_mib": peak / 2**20}
        rows.append(row)
        print(f"{name:<46} {row['ms']:>9.3f} ms  peak {peak / 2**30:.2f} GiB", flush=True)

    import diffusers
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__} on {where}")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        unet = UNet2DConditionModel.from_config(json.load(open(args.config)))
    unet = unet.to(dtype=bf)
    unet.requires_grad_(False)
    n = sum(p.numel() for p in unet.parameters())
    print(f"UNet {n} parameters, random weights built in {time.perf_counter() - t0:.1f} s")

    px, lat = args.px, args.px // 8
    cfg = unet.config
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim

    def inputs(batch):
        return (
            torch.randn(batch, cfg.in_channels, lat, lat, device=dev, dtype=bf),
            torch.full((batch,), 500.0, device=dev),
            torch.randn(batch, 77, cfg.cross_attention_dim, device=dev, dtype=bf),
            {
                "text_embeds": torch.randn(batch, pooled_dim, device=dev, dtype=bf),
                "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * batch, device=dev, dtype=bf),
            },
        )

    x, t, ctx, added = inputs(2)

    def fwd():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added)

    peak = peak_of(fwd)
    report(f"torch unet fwd {px}px b2 bf16", timed(fwd, args.reps), peak)

    # One micro-batch as kstyle's training_loss runs it: noise f32 latents at t = 500 on SDXL's
    # scaled-linear schedule, predict epsilon in bf16, MSE in f32, backward to the adapters.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)[500].item()
    _, t1, ctx1, added1 = inputs(1)
    x0 = torch.randn(1, cfg.in_channels, lat, lat, device=dev)
    noise = torch.randn_like(x0)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                   target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    print(f"LoRA: {len(params)} tensors, {sum(p.numel() for p in params)} parameters, {params[0].dtype}")

    def step():
        zt = ab**0.5 * x0 + (1 - ab) ** 0.5 * noise
        eps = unet(zt.to(bf), t1, encoder_hidden_states=ctx1, added_cond_kwargs=added1).sample
        F.mse_loss(eps.float(), noise).backward()
        for p in params:
            p.grad = None

    unet.train()
    for label, ckpt in (("lora r4", False), ("lora r4 ckpt", True)):
        if ckpt:
            unet.enable_gradient_checkpointing()
        peak = peak_of(step)
        report(f"torch unet train {label} {px}px b1 bf16", timed(step, args.reps), peak)
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
