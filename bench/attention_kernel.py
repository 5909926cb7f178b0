"""Kernel-level: cohere::flash_attention vs torch SDPA on Aya-8B attention shapes,
with HF's causal mask (as torch.compile sees it) and with is_causal. Reports TFLOP/s
(causal FLOPs: half of 4*B*H*Q*K*D) next to the measured bf16 matmul rate."""

import torch
import torch.nn.functional as F

import cohere_compile  # noqa: F401  (registers torch.ops.cohere)
from common import cuda_time_ms, environment, write_json


def main():
    rows = []
    for b, t in [(1, 2048), (4, 2048), (1, 8192)]:
        h, kv, d = 32, 8, 128
        q = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(b, t, kv, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(b, t, kv, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        vis = torch.ones(t, t, device="cuda", dtype=torch.bool).tril()
        mask = torch.where(vis, 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16)[None, None].expand(b, 1, t, t)
        flops = 4 * b * h * t * t * d / 2
        kr, vr = k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)
        cases = {
            "ours_mask": lambda: torch.ops.cohere.flash_attention(q, k, v, mask, d ** -0.5, False),
            "ours_causal": lambda: torch.ops.cohere.flash_attention(q, k, v, None, d ** -0.5, True),
            "sdpa_mask_repeat_kv": lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask),
            "sdpa_causal_gqa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        }
        ref = F.scaled_dot_product_attention(q.float(), kr.float(), vr.float(), is_causal=True)
        for name, fn in cases.items():
            err = ((fn().float() - ref).norm() / ref.norm()).item()
            tm = cuda_time_ms(fn, repeats=30)
            row = {"case": name, "batch": b, "seq": t, **tm, "tflops": flops / tm["median_ms"] / 1e9, "rel_err": err}
            rows.append(row)
            print(f"B{b} T{t} {name:<22} {tm['median_ms']:7.3f} ms {row['tflops']:6.1f} TFLOP/s  err {err:.1e}", flush=True)
    write_json("attention_kernel.json", {"env": environment(), "results": rows})


if __name__ == "__main__":
    main()
