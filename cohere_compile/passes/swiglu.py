"""``swiglu``: ``silu(gate_proj(x)) * up_proj(x)`` -> ``cohere::swiglu`` (the
pointwise part; the projections stay matmuls)."""

import torch
import torch.nn.functional as F
from torch._inductor.pattern_matcher import PatternMatcherPass

from ._patterns import register

NAME = "swiglu"


def _search(gate, up):
    return F.silu(gate) * up


def _replace(gate, up):
    return torch.ops.cohere.swiglu(gate, up)


def _search_wide_gate(gate, up):
    """peft's LoRA linear sums base and adapter in fp32 and casts the sum to the model's dtype."""
    return F.silu(gate.to(up.dtype)) * up


def _replace_wide_gate(gate, up):
    return torch.ops.cohere.swiglu(gate.to(up.dtype), up)


def _same_shape(match) -> bool:
    g, u = (match.kwargs[n].meta.get("val") for n in ("gate", "up"))
    return g is not None and u is not None and g.shape == u.shape


def build() -> list[PatternMatcherPass]:
    patterns = PatternMatcherPass(pass_name=NAME)
    register(patterns, _search, _replace, lambda dt: [torch.randn(2, 3, 8, dtype=dt), torch.randn(2, 3, 8, dtype=dt)],
             extra_check=_same_shape, grad_variants=[("gate", "up")])
    # Training graphs on torch 2.11 (fold_round_trip_casts): with an fp32 gate (a peft LoRA
    # gate_proj on a bf16 model), the gate gradient leaves the pattern as fp32 without its bf16
    # rounding, which the pattern above expects. Found on the H200: swiglu matched 0 times.
    register(patterns, _search_wide_gate, _replace_wide_gate,
             lambda dt: [torch.randn(2, 3, 8), torch.randn(2, 3, 8, dtype=dt)],
             extra_check=_same_shape, grad_variants=[("gate", "up")], inference=False,
             dtypes=(torch.bfloat16, torch.float16), fold_casts=True)
    return [patterns]
