"""Shared benchmark helpers: model shapes, timing with CUDA events, JSON output."""

from __future__ import annotations

import collections
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    # Aya 8B (Aya 23 / Expanse 8B): GQA, no QK norm
    "aya-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=256000, use_qk_norm=False, logit_scale=0.125),
    # Command R+ (08-2024): QK norm
    "command-r-plus": dict(hidden_size=12288, intermediate_size=33792, num_hidden_layers=64, num_attention_heads=96,
                           num_key_value_heads=8, vocab_size=256000, use_qk_norm=True, logit_scale=0.8333),
}

RESULTS = Path(__file__).resolve().parent / "results"


def build_model(shape, layers: int | None, dtype=torch.bfloat16, attn="sdpa", device="cuda", **config):
    """A random-weight CohereForCausalLM in eval mode. ``shape``: a SHAPES name or a dict of
    CohereConfig fields; ``config`` overrides the benchmark defaults (token ids, max positions)."""
    from transformers import CohereConfig, CohereForCausalLM

    kw = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    if layers:
        kw["num_hidden_layers"] = layers
    kw = {"max_position_embeddings": 8192, "pad_token_id": 0, "bos_token_id": 5, "eos_token_id": 255001,
          "attn_implementation": attn, **kw, **config}
    cfg = CohereConfig(**kw)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CohereForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-trivial norms, like a trained model
            if "norm" in name:
                torch.nn.init.normal_(p, 1.0, 0.1)
    return model


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def call_times_ms(fn, device, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls: CUDA events on the GPU, wall clock on CPU."""
    times = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def cuda_time_ms(fn, warmup: int = 3, repeats: int = 15) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = call_times_ms(fn, "cuda", repeats)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": repeats}


def first_call_s(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def environment() -> dict:
    import transformers
    import triton

    return {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_json(name: str, payload: dict) -> Path:
    """Write to bench/results/ and, on the lent GPU machine, also to $OUT (what comes back)."""
    text = json.dumps(payload, indent=2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / name).write_text(text)
    return path


def copy_bandwidth_gbs(device, nbytes=2 << 30) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * nbytes / statistics.median(times) / 1e9  # read + write


def cuda_graph_time_s(fn, calls: int = 20) -> float:
    """Median seconds per call of ``fn`` captured ``calls`` times in one CUDA graph (no launch
    overhead: how a kernel runs inside a graph-captured decode step)."""
    for _ in range(3):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def paged_attention_inputs(lengths, kv_heads: int, heads: int, head_dim: int, device="cuda", block_size: int = 256,
                           bool_mask: bool = False):
    """Arguments of ``cohere::paged_attention`` for one decode step of sequences of ``lengths``:
    random bf16 pools whose blocks are handed out in random order, the block table, the
    lengths, one query token per sequence and a mask hiding positions past each length
    (additive bf16, as ``cc.generate`` passes it, or bool). -> (args, K/V bytes it must read)."""
    bs = block_size
    rows, max_blocks = len(lengths), -(-max(lengths) // bs)
    n_blocks = sum(-(-n // bs) for n in lengths)
    k_pool = torch.randn(n_blocks, kv_heads, bs, head_dim, dtype=torch.bfloat16, device=device)
    v_pool = torch.randn_like(k_pool)
    table = torch.full((rows, max_blocks), -1, dtype=torch.int32)
    free = torch.randperm(n_blocks).tolist()
    for r, n in enumerate(lengths):
        for j in range(-(-n // bs)):
            table[r, j] = free.pop()
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    q = torch.randn(rows, heads, 1, head_dim, dtype=torch.bfloat16, device=device)
    visible = torch.arange(max_blocks * bs, device=device)[None] < lens[:, None]
    mask = visible if bool_mask else torch.where(visible, 0.0, float("-inf")).to(torch.bfloat16)
    kv_bytes = sum(lengths) * 2 * kv_heads * head_dim * 2
    return (q, k_pool, v_pool, table.to(device), lens, mask[:, None, None], head_dim ** -0.5), kv_bytes


# Kernel families for a profile's summary (first match wins; names as CUDA reports them)
KERNEL_FAMILIES = (
    ("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|sm90_|sm80_|splitk", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|attn", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("inductor fused", re.compile(r"^triton_(poi|red|per|tem)_")),
    ("copy / fill", re.compile(r"memcpy|memset|copy|fill|cat", re.I)),
)


def kernel_family(name: str) -> str:
    return next((family for family, pattern in KERNEL_FAMILIES if pattern.search(name)), "other")


def kernel_summary(prof, per: int, top: int = 30) -> dict:
    """CUDA kernel time of a torch.profiler run, per unit (``per`` tokens, steps, ...): the
    total, by family (KERNEL_FAMILIES) and the ``top`` kernels, with call counts."""
    kernel_us, calls = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernel_us[event.name[:100]] += event.device_time_total
            calls[event.name[:100]] += 1
    families = collections.Counter()
    for name, us in kernel_us.items():
        families[kernel_family(name)] += us
    return {
        "kernel_ms": sum(kernel_us.values()) / 1e3 / per,
        "families_ms": {f: us / 1e3 / per for f, us in families.most_common()},
        "top_kernels": [{"kernel": name, "us": us / per, "calls": calls[name] / per}
                        for name, us in kernel_us.most_common(top)],
    }
