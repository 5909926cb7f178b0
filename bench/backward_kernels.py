"""Kernel-level training cost: forward + backward of each ``cohere::`` op against the
same math in eager PyTorch (HF's formulation) and under ``torch.compile`` (Inductor's
own fused forward/backward), at Aya-8B sizes; attention against SDPA. Median ms,
ratio to the best peer, and peak extra memory per case.

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/backward_kernels.py             # H200, ~2 min
    PYTHONPATH=$PWD python bench/backward_kernels.py --tiny --device cpu            # smoke test of the script
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cohere_compile  # noqa: E402, F401  (registers torch.ops.cohere)
from common import call_times_ms, write_json  # noqa: E402

ops = torch.ops.cohere
EPS = 1e-5


def timed(fn, device: str, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = call_times_ms(fn, device, repeats)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    return {"median_ms": statistics.median(times), "min_ms": min(times), "peak_extra_mib": peak, "n": repeats}


def fwd_bwd(fn, inputs, grads):
    """One training step of ``fn``: forward, backward into fresh leaf grads."""
    leaves = [x.detach().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
              for x in inputs]

    def run():
        for x in leaves:
            if isinstance(x, torch.Tensor):
                x.grad = None
        out = fn(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out[: len(grads)], grads)
    return run


# ---------------------------------------------------------------- HF-form references


def hf_layer_norm(x, w):
    dt = x.dtype
    x = x.float()
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (w.float() * ((x - mean) * torch.rsqrt(var + EPS))).to(dt)


def hf_add3_layer_norm(r, a, m, w):
    h = r + a + m
    return h, hf_layer_norm(h, w)


def hf_qk_norm_rope(q, k, qw, kw, cos, sin):
    """q, k: (B, T, H, D) as projected; HF's per-head norm, transpose, interleaved RoPE."""
    q = hf_layer_norm(q, qw).transpose(1, 2)
    k = hf_layer_norm(k, kw).transpose(1, 2)
    dt = q.dtype
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)

    def rot(x):
        return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    q, k = q.float(), k.float()
    return (q * c + rot(q) * s).to(dt), (k * c + rot(k) * s).to(dt)


def ours_qk_norm_rope(q, k, qw, kw, cos, sin):
    return ops.qk_norm_rope(q.transpose(1, 2), k.transpose(1, 2), qw, kw, cos, sin, EPS)


def cases(b, t, hidden, inter, heads, kv, d, device, dtype):
    def rn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    x, w = rn(b, t, hidden), 1 + 0.1 * rn(hidden)
    g, u = rn(b, t, inter), rn(b, t, inter)
    q, k, v = rn(b, t, heads, d), rn(b, t, kv, d), rn(b, t, kv, d)
    qw, kw = 1 + 0.1 * rn(heads, d), 1 + 0.1 * rn(kv, d)
    ang = (torch.rand(1, t, d // 2, device=device) * 100).repeat_interleave(2, -1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    mask = torch.zeros(b, 1, t, t, device=device, dtype=dtype)
    mask.masked_fill_(~torch.ones(t, t, device=device, dtype=torch.bool).tril(), torch.finfo(dtype).min)
    if b > 1:
        mask[-1, :, :, : t // 10] = torch.finfo(dtype).min  # one left-padded row
    rep = heads // kv
    scale = d ** -0.5

    def sdpa_mask(q, k, v):  # HF sdpa with a padding mask: repeat_kv + additive mask
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                              attn_mask=mask, scale=scale)

    return {
        "swiglu": (ops.swiglu, lambda g, u: F.silu(g) * u, [g, u], [rn(b, t, inter)]),
        "layer_norm": (lambda x, w: ops.layer_norm(x, w, EPS), hf_layer_norm, [x, w], [rn(b, t, hidden)]),
        "add3_layer_norm": (lambda r, a, m, w: ops.add3_layer_norm(r, a, m, w, EPS), hf_add3_layer_norm,
                            [x, rn(b, t, hidden), rn(b, t, hidden), w], [rn(b, t, hidden), rn(b, t, hidden)]),
        "qk_norm_rope": (lambda q, k, qw, kw: ours_qk_norm_rope(q, k, qw, kw, cos, sin),
                         lambda q, k, qw, kw: hf_qk_norm_rope(q, k, qw, kw, cos, sin), [q, k, qw, kw],
                         [rn(b, heads, t, d), rn(b, kv, t, d)]),
        "attention_causal": (
            lambda q, k, v: ops.flash_attention_lse(q, k, v, None, scale, True)[0],
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True),
            [qt, kt, vt], [rn(b, heads, t, d)]),
        "attention_padding_mask": (
            lambda q, k, v: ops.flash_attention_lse(q, k, v, mask, scale, False)[0], sdpa_mask,
            [qt, kt, vt], [rn(b, heads, t, d)]),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--only", nargs="*", help="case names to run (default: all)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (script smoke test on CPU)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        dims = dict(b=2, t=32, hidden=64, inter=96, heads=4, kv=2, d=16)
        args.repeats = min(args.repeats, 3)
    else:
        dims = dict(b=args.batch, t=args.seq, hidden=4096, inter=14336, heads=32, kv=8, d=128)
    torch._dynamo.config.cache_size_limit = 64
    rows = []
    print(f"{'case':<24}{'impl':<10}{'median ms':>11}{'vs best peer':>14}{'peak MiB':>10}")
    for name, (ours, ref, inputs, grads) in cases(**dims, device=args.device, dtype=dtype).items():
        if args.only and name not in args.only:
            continue
        impls = {"ours": ours, "eager": ref}
        if not args.no_compile:
            impls["compiled"] = torch.compile(ref)
        results = {}
        for impl, fn in impls.items():
            results[impl] = timed(fwd_bwd(fn, inputs, grads), args.device, warmup=2, repeats=args.repeats)
        best_peer = min(r["median_ms"] for i, r in results.items() if i != "ours")
        for impl, r in results.items():
            row = {"case": name, "impl": impl, **dims, "dtype": args.dtype, **r,
                   "ratio_to_best_peer": r["median_ms"] / best_peer}
            rows.append(row)
            print(f"{name:<24}{impl:<10}{r['median_ms']:>11.3f}{row['ratio_to_best_peer']:>14.2f}"
                  f"{r['peak_extra_mib']:>10.0f}", flush=True)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    suffix = "_tiny_cpu" if args.tiny else f"_B{dims['b']}_T{dims['t']}"
    path = write_json(f"backward_kernels{suffix}.json", {"env": env, "args": vars(args), "results": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
