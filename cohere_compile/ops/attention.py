"""``cohere::flash_attention``: softmax attention with native GQA (K/V never repeated)."""

from typing import Optional

import torch

from ..kernels import attention as kernel
from ..kernels import empty_heads_like
from . import reference
from ._dispatch import check_inputs, use_triton


@torch.library.custom_op("cohere::flash_attention", mutates_args=())
def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    is_causal: bool,
) -> torch.Tensor:
    """q: (B, H, Q, D); k, v: (B, Hkv, K, D), H a multiple of Hkv; mask broadcastable to
    (B, H, Q, K), bool (True = attend) or additive float. Output (B, H, Q, D)."""
    check_inputs("cohere::flash_attention", q, k, v, mask)
    if q.shape[1] % k.shape[1] or k.shape != v.shape:
        raise ValueError(
            f"cohere::flash_attention: query heads {q.shape[1]} must be a multiple of KV heads "
            f"{k.shape[1]}, and k {tuple(k.shape)} must match v {tuple(v.shape)}"
        )
    if use_triton(q):
        return kernel.flash_attention(q, k, v, mask, scale, is_causal)
    return empty_heads_like(q).copy_(reference.flash_attention(q, k, v, mask, scale, is_causal))


@flash_attention.register_fake
def _(q, k, v, mask, scale, is_causal):
    return empty_heads_like(q)
