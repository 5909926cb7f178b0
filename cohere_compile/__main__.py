"""``python -m cohere_compile``: eager vs optimized on a small built-in Cohere config.

Prints the pass table, the largest logits difference and timings. ``--config`` takes a
Hugging Face config name or local path (random weights are used: nothing is downloaded
unless the name is not a local path and the hub is reachable).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

import cohere_compile as cc

DEMO_CONFIG = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=2, use_qk_norm=True, logit_scale=0.0625,
    max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def build_model(config_name: str | None, device: str, dtype: torch.dtype, layers: int | None = None):
    from transformers import AutoConfig, CohereConfig, CohereForCausalLM

    config = AutoConfig.from_pretrained(config_name) if config_name else CohereConfig(**DEMO_CONFIG)
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = CohereForCausalLM(config).to(dtype).eval()
    return model


def time_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cohere_compile", description=__doc__)
    parser.add_argument("--config", help="HF config name or local path (default: a small built-in Cohere config)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    console = Console()
    dtype = getattr(torch, args.dtype)
    model = build_model(args.config, args.device, dtype)
    cfg = model.config
    console.print(f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}"
                  f"/{cfg.num_key_value_heads} kv, qk_norm={cfg.use_qk_norm}, {args.dtype} on {args.device}")
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.seq), device=args.device)

    with torch.no_grad():
        eager_logits = model(ids).logits
        eager_ms = time_ms(lambda: model(ids), args.repeats)
        cc.optimize(model)
        report = cc.explain(model, ids)
        start = time.perf_counter()
        opt_logits = model(ids).logits
        compile_s = time.perf_counter() - start
        opt_ms = time_ms(lambda: model(ids), args.repeats)

    console.print(str(report))
    diff = (opt_logits.float() - eager_logits.float()).abs().max().item()
    rel = ((opt_logits.double() - eager_logits.double()).norm() / eager_logits.double().norm()).item()
    table = Table(title=f"B{args.batch} x {args.seq} forward")
    for col in ("", "eager HF", "cc.optimize"):
        table.add_column(col)
    table.add_row("median ms", f"{eager_ms:.2f}", f"{opt_ms:.2f}")
    table.add_row("first call s", "-", f"{compile_s:.1f}")
    console.print(table)
    console.print(f"max |logits diff| = {diff:.3e}   relative = {rel:.3e}")
    if report.missing:
        raise SystemExit(f"passes that missed subgraphs: {report.missing}")


if __name__ == "__main__":
    main()
