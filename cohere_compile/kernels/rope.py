"""Cohere's interleaved RoPE, optionally preceded by the per-head QK LayerNorm.

One launch handles q and k together: program ``p`` owns token ``(b, t)`` and rotates
all of its query heads, then all of its key heads. RoPE pairs neighbouring
elements ``(2i, 2i+1)`` (``repeat_interleave`` frequencies, not Llama's half split),
so each element is combined with its partner at index ``d ^ 1``.

Rounding follows the eager model: the normed head is rounded to the input dtype
before it is upcast again for the rotation, and the result is rounded once.
"""

import triton
import triton.language as tl

from . import empty_heads_like, next_pow2


@triton.jit
def _rotate_heads(
    x_ptr, sxb, sxh, sxt, sxd,
    o_ptr, sob, soh, sot,
    w_ptr, cos, sin, b, t, n_heads, head_dim, eps,
    HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    valid = (h < n_heads) & (d < head_dim)
    row = x_ptr + b * sxb + t * sxt + h * sxh
    x = tl.load(row + d * sxd, mask=valid, other=0.0).to(tl.float32)
    partner = tl.load(row + (d ^ 1) * sxd, mask=valid, other=0.0).to(tl.float32)
    if HAS_NORM:
        mean = tl.sum(x, axis=1) / head_dim
        centred = tl.where(valid, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / head_dim + eps)
        w = tl.load(w_ptr + h * head_dim + d, mask=valid, other=0.0).to(tl.float32)
        w_partner = tl.load(w_ptr + h * head_dim + (d ^ 1), mask=valid, other=0.0).to(tl.float32)
        x = (w * (centred * rstd[:, None])).to(o_ptr.dtype.element_ty).to(tl.float32)
        partner = (w_partner * ((partner - mean[:, None]) * rstd[:, None]))
        partner = partner.to(o_ptr.dtype.element_ty).to(tl.float32)
    sign = tl.where((d % 2) == 0, -1.0, 1.0)
    out = x * cos + (sign * partner) * sin
    tl.store(o_ptr + b * sob + t * sot + h * soh + d, out.to(o_ptr.dtype.element_ty), mask=valid)


@triton.jit
def qk_norm_rope_kernel(
    q_ptr, sqb, sqh, sqt, sqd,
    k_ptr, skb, skh, skt, skd,
    qo_ptr, sqob, sqoh, sqot,
    ko_ptr, skob, skoh, skot,
    qw_ptr, kw_ptr,
    cos_ptr, sin_ptr, scb, sct, scd,
    seq_len, n_q_heads, n_k_heads, head_dim, eps,
    HAS_NORM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_D)[None, :]
    d_valid = d < head_dim
    cos = tl.load(cos_ptr + b * scb + t * sct + d * scd, mask=d_valid, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * scb + t * sct + d * scd, mask=d_valid, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, sqb, sqh, sqt, sqd, qo_ptr, sqob, sqoh, sqot, qw_ptr, cos, sin,
                  b, t, n_q_heads, head_dim, eps, HAS_NORM, BLOCK_HQ, BLOCK_D)
    _rotate_heads(k_ptr, skb, skh, skt, skd, ko_ptr, skob, skoh, skot, kw_ptr, cos, sin,
                  b, t, n_k_heads, head_dim, eps, HAS_NORM, BLOCK_HK, BLOCK_D)


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps):
    """q: (B, Hq, T, D), k: (B, Hk, T, D) (any strides); cos/sin: (B|1, T, D).
    Weights (Hq, D) / (Hk, D) or both None (RoPE only). Returns rotated (q, k)."""
    bsz, n_q, seq, dim = q.shape
    n_k = k.shape[1]
    q_out, k_out = empty_heads_like(q), empty_heads_like(k)
    has_norm = q_weight is not None
    if has_norm:
        q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
    cos = cos.expand(bsz, seq, dim)
    sin = sin.expand(bsz, seq, dim)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if bsz * seq:
        block_d = next_pow2(dim)
        qk_norm_rope_kernel[(bsz * seq,)](
            q, *q.stride(), k, *k.stride(),
            q_out, *q_out.stride()[:3], k_out, *k_out.stride()[:3],
            q_weight if has_norm else q, k_weight if has_norm else k,
            cos, sin, *cos.stride(),
            seq, n_q, n_k, dim, float(eps),
            HAS_NORM=has_norm, BLOCK_HQ=next_pow2(n_q), BLOCK_HK=next_pow2(n_k),
            BLOCK_D=block_d, num_warps=4,
        )
    return q_out, k_out
