"""Paged KV cache ops: ``cohere::paged_kv_write`` (and ``cohere::qk_norm_rope_kv_write``, the
same write fused with the step's QK-norm / RoPE), ``cohere::paged_gather`` and
``cohere::paged_attention``.

``paged_gather`` is what the cache hands to Hugging Face's attention (a dense
``(B, Hkv, L, D)`` view, zeros past each sequence's length), so an unoptimized model
works unchanged; the ``paged_attention`` pass then replaces decode attention over
gathered K/V with ``paged_attention``, which reads the pool through the block table
and never builds the dense copy.
"""

from typing import Optional

import torch

from ..kernels import paged as kernel
from ..kernels import rope as rope_kernel
from ..kernels import empty_heads_like
from . import reference
from ._dispatch import check_inputs, use_triton
from .rope import check_rope_args


def _check_write(op, k_pool, k, v, slots):
    if k.shape != v.shape or k.shape[1] != k_pool.shape[1] or k.shape[3] != k_pool.shape[3]:
        raise ValueError(f"{op}: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit the pool "
                         f"{tuple(k_pool.shape)} (num_blocks, kv_heads, block_size, head_dim)")
    if slots.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"{op}: slots {tuple(slots.shape)} must be (batch, tokens) = {(k.shape[0], k.shape[2])}")


def _check_pool(op, pool, block_table, lens):
    if pool.dim() != 4:
        raise ValueError(f"{op}: pool must be (num_blocks, kv_heads, block_size, head_dim), got {tuple(pool.shape)}")
    if block_table.dtype != torch.int32 or lens.dtype != torch.int32:
        raise TypeError(f"{op}: block_table and lengths must be int32, got {block_table.dtype} and {lens.dtype}")


@torch.library.custom_op("cohere::paged_kv_write", mutates_args=("k_pool", "v_pool"))
def paged_kv_write(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slots: torch.Tensor) -> None:
    """Write k, v (B, Hkv, T, D) into the pools at flat slots (B, T) = block * block_size + offset;
    slot -1 skips the token (an idle batch row)."""
    check_inputs("cohere::paged_kv_write", k_pool, v_pool, k, v)
    _check_write("cohere::paged_kv_write", k_pool, k, v, slots)
    if use_triton(k):
        kernel.paged_kv_write(k_pool, v_pool, k, v, slots)
    else:
        reference.paged_write(k_pool, v_pool, k, v, slots)


@torch.library.custom_op("cohere::qk_norm_rope_kv_write", mutates_args=("k_pool", "v_pool"))
def qk_norm_rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: Optional[torch.Tensor],
                          k_weight: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, eps: float,
                          k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``cohere::qk_norm_rope`` then ``cohere::paged_kv_write`` of the rotated k and of v, in one
    kernel; returns the rotated q (the rotated k only lands in the pool)."""
    check_inputs("cohere::qk_norm_rope_kv_write", q, k, v, q_weight, k_weight, cos, sin, k_pool, v_pool)
    _check_write("cohere::qk_norm_rope_kv_write", k_pool, k, v, slots)
    check_rope_args("cohere::qk_norm_rope_kv_write", q, k, q_weight, k_weight)
    if use_triton(q):
        return rope_kernel.qk_norm_rope_kv_write(q, k, v, q_weight, k_weight, cos, sin, eps, k_pool, v_pool, slots)
    q_rot, k_rot = reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)
    reference.paged_write(k_pool, v_pool, k_rot, v, slots)
    return empty_heads_like(q).copy_(q_rot)


@qk_norm_rope_kv_write.register_fake
def _(q, k, v, q_weight, k_weight, cos, sin, eps, k_pool, v_pool, slots):
    check_rope_args("cohere::qk_norm_rope_kv_write", q, k, q_weight, k_weight)
    return empty_heads_like(q)


@torch.library.custom_op("cohere::paged_gather", mutates_args=())
def paged_gather(pool: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor, view_len: int) -> torch.Tensor:
    """Dense (B, Hkv, view_len, D) copy of each sequence's cached keys or values."""
    check_inputs("cohere::paged_gather", pool)
    _check_pool("cohere::paged_gather", pool, block_table, kv_lens)
    return reference.paged_gather(pool, block_table, kv_lens, view_len).contiguous()


@paged_gather.register_fake
def _(pool, block_table, kv_lens, view_len):
    return pool.new_empty((block_table.shape[0], pool.shape[1], view_len, pool.shape[3]))


@torch.library.custom_op("cohere::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                    kv_lens: torch.Tensor, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Decode attention: q (B, H, 1, D) over the first ``kv_lens[b]`` positions of sequence b in the
    pools (read through ``block_table``), native GQA; ``mask`` (optional, bool or additive, shape
    (B, 1 or H, 1, >= view_len)) is applied on top. A head with nothing visible returns zeros."""
    check_inputs("cohere::paged_attention", q, k_pool, v_pool, mask)
    _check_pool("cohere::paged_attention", k_pool, block_table, kv_lens)
    if q.shape[2] != 1:
        raise ValueError(f"cohere::paged_attention: one query token per sequence (decode), got {q.shape[2]}")
    if q.shape[1] % k_pool.shape[1]:
        raise ValueError(f"cohere::paged_attention: query heads {q.shape[1]} must be a multiple of KV heads "
                         f"{k_pool.shape[1]}")
    if mask is not None and (mask.dim() != 4 or mask.shape[2] != 1 or mask.shape[1] not in (1, q.shape[1])):
        raise ValueError(f"cohere::paged_attention: mask must be (B, 1 or H, 1, L), got {tuple(mask.shape)}")
    if use_triton(q):
        return kernel.paged_decode_attention(q, k_pool, v_pool, block_table, kv_lens, mask, scale,
                                             empty_heads_like(q))
    return empty_heads_like(q).copy_(reference.paged_attention(q, k_pool, v_pool, block_table, kv_lens, mask, scale))


@paged_attention.register_fake
def _(q, k_pool, v_pool, block_table, kv_lens, mask, scale):
    return empty_heads_like(q)
