"""``python -m cohere_compile.train``: fine-tune a Cohere model through ``cc.optimize``.

A small, complete training loop: LoRA (peft) on all seven linears or a full fine-tune,
AdamW, optional gradient checkpointing, random or given token data, a progress bar with
the loss and tokens/s. Defaults to the small built-in config of ``python -m cohere_compile``
(random weights), so it runs on a CPU. ``--config`` takes a Hugging Face config name or
path (random weights too: this is a driver for measuring and testing, not a recipe).

    python -m cohere_compile.train --steps 20                      # tiny config, LoRA r16
    python -m cohere_compile.train --mode full --compile none      # eager full fine-tune
    python -m cohere_compile.train --data tokens.pt --seq 512      # token ids from a file
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPILE_MODES = ("cc", "torch", "none")


def add_lora(model, r: int = 16, alpha: int | None = None, dropout: float = 0.0, targets=LORA_TARGETS):
    """peft LoRA on ``targets`` (default: all seven linears of every layer)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout, target_modules=list(targets),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def compile_model(model, how: str, regional: bool = True, passes=None, training_rewrites: bool = False,
                  activation_memory_budget: float | None = None):
    """``cc`` = cc.optimize (regional by default), ``torch`` = torch.compile, ``none`` = eager."""
    if how == "cc":
        import cohere_compile as cc

        return cc.optimize(model, passes=passes, regional=regional, training_rewrites=training_rewrites,
                           activation_memory_budget=activation_memory_budget)
    if how == "torch":
        model.compile()
        return model
    if how == "none":
        return model
    raise ValueError(f"unknown compile mode {how!r}; choose from {list(COMPILE_MODES)}")


def token_batches(vocab: int, batch: int, seq: int, data: str | None = None, n_batches: int = 8, seed: int = 0):
    """``n_batches`` batches of shape (batch, seq): random ids, or windows of a token file
    (``.pt`` tensor or ``.npy`` array of ids, any shape; flattened)."""
    g = torch.Generator().manual_seed(seed)
    if data is None:
        return [torch.randint(3, vocab, (batch, seq), generator=g) for _ in range(n_batches)]
    path = Path(data)
    if path.suffix == ".npy":
        import numpy as np

        ids = torch.from_numpy(np.load(path)).long().flatten()
    elif path.suffix == ".pt":
        ids = torch.as_tensor(torch.load(path)).long().flatten()
    else:
        raise ValueError(f"--data {data}: expected a .pt tensor or .npy array of token ids")
    if ids.numel() < batch * seq:
        raise ValueError(f"--data {data}: {ids.numel()} tokens, fewer than one batch ({batch} x {seq}); lower --seq")
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ValueError(f"--data {data}: token ids must lie in [0, {vocab}) for this config's vocabulary")
    starts = torch.randint(0, ids.numel() - seq + 1, (n_batches, batch), generator=g)
    return [torch.stack([ids[s : s + seq] for s in row.tolist()]) for row in starts]


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    tokens_per_step: int = 0

    @property
    def first_step_s(self) -> float:
        return self.step_s[0]

    def tokens_per_s(self, warmup: int = 1) -> float:
        """Median over the steps after ``warmup`` (the first step compiles)."""
        steady = self.step_s[warmup:] or self.step_s
        return self.tokens_per_step / statistics.median(steady)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train(model, batches, steps: int, lr: float = 1e-4, progress: bool = True, device="cpu",
          on_step=None) -> TrainResult:
    """AdamW on the trainable parameters, labels = inputs (HF shifts them), no KV cache.
    ``on_step()``, when given, runs after every step (e.g. a torch.profiler's ``step``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    result = TrainResult(tokens_per_step=batches[0].numel())
    bar = _progress(progress)
    with bar:
        task = bar.add_task("train", total=steps, loss=float("nan"), tps=0.0)
        for step in range(steps):
            ids = batches[step % len(batches)].to(device)
            _sync(device)
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = loss.item()  # syncs
            result.step_s.append(time.perf_counter() - start)
            result.losses.append(loss)
            bar.update(task, advance=1, loss=loss, tps=result.tokens_per_step / result.step_s[-1])
            if on_step is not None:
                on_step()
    return result


class _NoProgress:
    """Stands in for rich's Progress when the bar is off (bench runs; rich not needed)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
    )


def main(argv=None) -> TrainResult:
    from rich.console import Console

    from .__main__ import build_model

    parser = argparse.ArgumentParser(prog="python -m cohere_compile.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="HF config name or local path (default: small built-in Cohere config)")
    parser.add_argument("--layers", type=int, help="override num_hidden_layers")
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=None, help="default 2 * r")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--compile", choices=COMPILE_MODES, default="cc", dest="how")
    parser.add_argument("--whole-model", action="store_true", help="cc: compile the whole model, not per layer")
    parser.add_argument("--passes", nargs="*", help="cc: pass names (default: cohere_compile.DEFAULT_PASSES)")
    parser.add_argument("--activation-memory-budget", type=float, default=None,
                        help="cc: keep this fraction (0..1) of the activations PyTorch would save; recompute the rest")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--data", help=".pt / .npy file of token ids (default: random tokens)")
    parser.add_argument("--batches", type=int, default=8, help="distinct batches, cycled (1 = repeat one batch)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    console = Console()
    model = build_model(args.config, args.device, getattr(torch, args.dtype), layers=args.layers)
    cfg = model.config
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.mode == "lora":
        model = add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
        # The embedding is frozen, so layer 0's input would need no gradient and the
        # regional compile would build a second layer graph just for it; HF's hook (what
        # gradient checkpointing enables anyway) costs one extra input gradient instead.
        model.enable_input_require_grads()
    model = compile_model(model, args.how, regional=not args.whole_model, passes=args.passes,
                          activation_memory_budget=args.activation_memory_budget)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    console.print(f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
                  f"{args.dtype} on {args.device}; {args.mode}, {trainable:,} trainable parameters; compile={args.how}"
                  f"{'' if args.how != 'cc' else (' (whole model)' if args.whole_model else ' (regional)')}")
    batches = token_batches(cfg.vocab_size, args.batch, args.seq, args.data, n_batches=args.batches)
    result = train(model, batches, args.steps, lr=args.lr, progress=not args.no_progress, device=args.device)
    console.print(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}   first step {result.first_step_s:.1f} s   "
                  f"{result.tokens_per_s():,.0f} tok/s (median after the first step)")
    return result


if __name__ == "__main__":
    main()
