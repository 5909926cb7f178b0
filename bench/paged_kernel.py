"""Sweep the paged decode-attention kernel's launch knobs on the GPU (no model).

For Aya-8B heads (32 query / 8 KV, D 128, bf16, block 256) at batch 1 (one 640-token
sequence) and a ragged batch of 32 (100..2000 tokens + 64): achieved bandwidth on the K/V
bytes each configuration must read, timed as a CUDA graph of 20 calls, against the
measured device copy bandwidth. The balanced plan (splits sized from the real lengths, the
default) is swept; the earlier plan (one split length for all, ``balance=False``) runs at its
old defaults for a same-run comparison.

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/paged_kernel.py
"""

import argparse
import inspect
import itertools

import torch

from bench.common import copy_bandwidth_gbs, cuda_graph_time_s, environment, paged_attention_inputs, write_json
from cohere_compile.kernels import empty_heads_like
from cohere_compile.kernels.paged import paged_decode_attention


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="paged_kernel_sweep_v3.json", help="JSON name under bench/results/")
    out_name = ap.parse_args(argv).name
    bandwidth = copy_bandwidth_gbs(torch.device("cuda"))
    workloads = {"b1": [640], "ragged32": [round(100 + i * 1900 / 31) + 64 for i in range(32)]}
    rows = []
    for name, lengths in workloads.items():
        args, kv_bytes = paged_attention_inputs(lengths, kv_heads=8, heads=32, head_dim=128)
        out = empty_heads_like(args[0])
        # 2026-12-02's sweep had 1024 programs best of (1024, 2048, 4096) and never tried fewer: each
        # program's dependent loads (lengths -> block table -> first K/V tile) are latency it pays
        # once, so fewer, longer programs may pay; 128-key tiles were not tried either
        configs = [(True, *c) for c in itertools.product((64, 128), (4, 8), (2, 3), (256, 512, 1024))]
        configs.append((False, 64, 4, 2, 1024))  # the earlier plan at its defaults
        for balance, block_n, warps, stages, target in configs:
            try:
                t = cuda_graph_time_s(lambda: paged_decode_attention(*args, out, block_n=block_n, num_warps=warps,
                                                              num_stages=stages, target_programs=target,
                                                              balance=balance))
            except Exception as e:  # a config that does not compile (e.g. registers) is skipped
                print(name, balance, block_n, warps, stages, target, "failed:", type(e).__name__)
                continue
            gbs = kv_bytes / t / 1e9
            rows.append({"workload": name, "balance": balance, "block_n": block_n, "num_warps": warps,
                         "num_stages": stages, "target_programs": target, "us": t * 1e6, "gbs": gbs,
                         "fraction_of_copy": gbs / bandwidth})
        best = sorted((r for r in rows if r["workload"] == name), key=lambda r: r["us"])[:5]
        knobs = inspect.signature(paged_decode_attention).parameters
        current = tuple(knobs[k].default for k in ("balance", "block_n", "num_warps", "num_stages", "target_programs"))
        default = [r for r in rows if r["workload"] == name and tuple(r[k] for k in (
            "balance", "block_n", "num_warps", "num_stages", "target_programs")) == current]
        earlier = [r for r in rows if r["workload"] == name and not r["balance"]]
        print(name, "default", default, "earlier plan", earlier, "\nbest", *best, sep="\n  ")
    write_json(out_name, {"env": environment(), "copy_bandwidth_gbs": bandwidth, "rows": rows})


if __name__ == "__main__":
    main()
