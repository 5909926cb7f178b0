"""``cohere::flash_attention``: softmax attention with native GQA (K/V never repeated)."""

from typing import Optional

import torch

from ..kernels import attention as kernel
from ..kernels import attention_backward as bwd_kernel
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


@torch.library.custom_op("cohere::causal_attention", mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention over a block without history (query i sees keys 0..i; Q == K), native GQA.

    The ``attention`` pass uses it where HF's mask is plain causality (no padding, no cache
    prefix): then PyTorch's SDPA with ``is_causal`` runs FlashAttention on CUDA, which on the H200
    was 2-2.5x faster than our Triton kernel with HF's additive mask (README, attention kernel
    table). Inference graphs only (no autograd). Output (B, H, Q, D), laid out as (B, Q, H, D)."""
    check_inputs("cohere::causal_attention", q, k, v)
    if q.shape[1] % k.shape[1] or k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"cohere::causal_attention: query heads {q.shape[1]} must be a multiple of KV heads {k.shape[1]}, "
            f"k {tuple(k.shape)} must match v {tuple(v.shape)}, and q and k must have the same length "
            f"(got {q.shape[2]} and {k.shape[2]})"
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    want = empty_heads_like(q)
    if out.stride() == want.stride():  # FlashAttention writes this layout itself: no copy
        return out
    return want.copy_(out)


@causal_attention.register_fake
def _(q, k, v, scale):
    return empty_heads_like(q)


# ---------------------------------------------------------------- training
# ``flash_attention_lse`` is the training form: it also returns the per-row log-sum-exp
# (B, H, Q) fp32, log2 units, which its backward reads instead of redoing the softmax
# statistics. ``flash_attention`` itself stays the inference op; its autograd (for
# direct callers) recomputes that log-sum-exp with one extra forward.


def _check(q, k, v, mask, name):
    check_inputs(name, q, k, v, mask)
    if q.shape[1] % k.shape[1] or k.shape != v.shape:
        raise ValueError(
            f"{name}: query heads {q.shape[1]} must be a multiple of KV heads "
            f"{k.shape[1]}, and k {tuple(k.shape)} must match v {tuple(v.shape)}"
        )


@torch.library.custom_op("cohere::flash_attention_lse", mutates_args=())
def flash_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float, is_causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``flash_attention`` plus its (B, H, Q) fp32 log-sum-exp (log2 units; -inf for a row that sees nothing)."""
    _check(q, k, v, mask, "cohere::flash_attention_lse")
    if use_triton(q):
        return kernel.flash_attention(q, k, v, mask, scale, is_causal, return_lse=True)
    out, lse = reference.flash_attention_lse(q, k, v, mask, scale, is_causal)
    return empty_heads_like(q).copy_(out), lse.contiguous()


@flash_attention_lse.register_fake
def _(q, k, v, mask, scale, is_causal):
    b, h, m, _ = q.shape
    return empty_heads_like(q), q.new_empty((b, h, m), dtype=torch.float32)


@torch.library.custom_op("cohere::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, mask: Optional[torch.Tensor], scale: float, is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``; dk / dv have the KV heads' shape (GQA groups summed in the kernel)."""
    _check(q, k, v, mask, "cohere::flash_attention_backward")
    check_inputs("cohere::flash_attention_backward", grad_out, out)
    if use_triton(q):
        return bwd_kernel.flash_attention_backward(grad_out, q, k, v, out, lse, mask, scale, is_causal)
    dq, dk, dv = reference.flash_attention_backward(grad_out, q, k, v, mask, scale, is_causal)
    return empty_heads_like(q).copy_(dq), empty_heads_like(k).copy_(dk), empty_heads_like(v).copy_(dv)


@flash_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, mask, scale, is_causal):
    return empty_heads_like(q), empty_heads_like(k), empty_heads_like(v)


def _no_mask_grad(ctx):
    if ctx.needs_input_grad[3]:
        raise RuntimeError("cohere::flash_attention: the mask gets no gradient; pass it without requires_grad")


def _setup_lse(ctx, inputs, output):
    q, k, v, mask, scale, is_causal = inputs
    ctx.scale, ctx.is_causal = scale, is_causal
    ctx.save_for_backward(q, k, v, mask, *output)


def _backward_lse(ctx, grad_out, _grad_lse):
    _no_mask_grad(ctx)
    q, k, v, mask, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.cohere.flash_attention_backward(grad_out, q, k, v, out, lse, mask, ctx.scale, ctx.is_causal)
    return dq, dk, dv, None, None, None


def _setup_plain(ctx, inputs, output):
    q, k, v, mask, scale, is_causal = inputs
    ctx.scale, ctx.is_causal = scale, is_causal
    ctx.save_for_backward(q, k, v, mask)


def _backward_plain(ctx, grad_out):
    _no_mask_grad(ctx)
    q, k, v, mask = ctx.saved_tensors
    out, lse = torch.ops.cohere.flash_attention_lse(q, k, v, mask, ctx.scale, ctx.is_causal)
    dq, dk, dv = torch.ops.cohere.flash_attention_backward(grad_out, q, k, v, out, lse, mask, ctx.scale, ctx.is_causal)
    return dq, dk, dv, None, None, None


flash_attention_lse.register_autograd(_backward_lse, setup_context=_setup_lse)
flash_attention.register_autograd(_backward_plain, setup_context=_setup_plain)
