"""``cohere::qk_norm_rope``: optional per-head QK LayerNorm + interleaved RoPE on q and k."""

from typing import Optional

import torch

from ..kernels import empty_heads_like
from ..kernels import rope as kernel
from . import reference
from ._dispatch import check_inputs, eps_value, use_triton


def _qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps):
    """q: (B, Hq, T, D), k: (B, Hk, T, D); outputs have the same shapes, laid out (B, T, H, D)."""
    check_inputs("cohere::qk_norm_rope", q, k, q_weight, k_weight, cos, sin)
    if (q_weight is None) != (k_weight is None):
        raise ValueError("cohere::qk_norm_rope: pass both q_weight and k_weight, or neither")
    if q.shape[-1] % 2:
        raise ValueError(f"cohere::qk_norm_rope: head_dim must be even for RoPE, got {q.shape[-1]}")
    eps = eps_value(eps)
    if use_triton(q):
        return kernel.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
    q_ref, k_ref = reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
    q_out, k_out = empty_heads_like(q), empty_heads_like(k)
    return q_out.copy_(q_ref), k_out.copy_(k_ref)


@torch.library.custom_op("cohere::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)


@torch.library.custom_op("cohere::qk_norm_rope_tensor_eps", mutates_args=())
def qk_norm_rope_tensor_eps(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)


def _fake(q, k, q_weight, k_weight, cos, sin, eps):
    return empty_heads_like(q), empty_heads_like(k)


for _op in (qk_norm_rope, qk_norm_rope_tensor_eps):
    _op.register_fake(_fake)
