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


def _same_shape(match) -> bool:
    g, u = (match.kwargs[n].meta.get("val") for n in ("gate", "up"))
    return g is not None and u is not None and g.shape == u.shape


def build() -> list[PatternMatcherPass]:
    patterns = PatternMatcherPass(pass_name=NAME)
    register(patterns, _search, _replace, lambda dt: [torch.randn(2, 3, 8, dtype=dt), torch.randn(2, 3, 8, dtype=dt)],
             extra_check=_same_shape, grad_variants=[("gate", "up")])
    return [patterns]
