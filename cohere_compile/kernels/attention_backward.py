"""Flash attention backward (FA2 style) with native GQA.

The forward saves the per-row log-sum-exp (``lse``, log2 units of the scaled scores);
probabilities are recomputed tile by tile, never stored. Two kernels:

- ``dkdv``: program ``(n, b*Hkv + kvh)`` owns ``BLOCK_N`` keys of one KV head and loops
  over every query head of its GQA group and every query block, accumulating dK and dV
  in registers: repeated K/V are never built and no atomics are needed.
- ``dq``: program ``(m, b*H + h)`` owns ``BLOCK_M`` queries and loops over key blocks.

``delta = rowsum(dO * O)`` (the softmax-backward correction) is a tiny torch reduction.
Masking matches the forward: causal (top-left aligned), bool or additive float masks
(values at or below half the dtype's most negative number are masked), and a row that
sees nothing has zero probabilities, hence zero gradients.
"""

import torch
import triton
import triton.language as tl

from . import empty_heads_like, interpreting, next_pow2
from .attention import LOG2E, _expand_mask


@triton.jit
def _probs(q, k, offs_m, offs_n, row_ok, col_ok, lse, m_base, smm, smn, qk_scale, mask_floor,
           HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
           IEEE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Recompute the (BLOCK_M, BLOCK_N) probabilities of one tile from the saved lse."""
    visible = row_ok[:, None] & col_ok[None, :]
    if IS_CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    bias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if HAS_MASK:
        mv = tl.load(m_base + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=visible, other=0)
        if MASK_IS_BOOL:
            visible = visible & (mv != 0)
        else:
            mv = mv.to(tl.float32)
            visible = visible & (mv > mask_floor)
            bias = tl.where(visible, mv, 0.0) * 1.4426950408889634
    if IEEE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale + bias
    return tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)


@triton.jit
def _dot(a, b, IEEE_DOT: tl.constexpr):
    if IEEE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def flash_attention_bwd_dkdv_kernel(
    q_ptr, sqb, sqh, sqm, sqd,
    k_ptr, skb, skh, skn, skd,
    v_ptr, svb, svh, svn, svd,
    do_ptr, sdob, sdoh, sdom, sdod,
    lse_ptr, delta_ptr,
    mask_ptr, smb, smh, smm, smn, n_mask_heads,
    dk_ptr, sdkb, sdkh, sdkn, sdkd,
    dv_ptr, sdvb, sdvh, sdvn, sdvd,
    n_heads, n_kv_heads, n_rep, q_len, kv_len, head_dim, qk_scale, sm_scale, mask_floor,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)
    b = bkv // n_kv_heads
    kvh = bkv % n_kv_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < kv_len
    d_ok = offs_d < head_dim
    kv_tile = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_tile, other=0.0)
    v = tl.load(v_ptr + b * svb + kvh * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_tile, other=0.0)
    if UPCAST_DOT:  # Triton 3.6's interpreter mis-multiplies bf16/fp16 tl.dot operands
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_lo = 0
    if IS_CAUSAL:  # query blocks wholly above the diagonal see none of these keys
        m_lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for r in range(0, n_rep):
        h = kvh * n_rep + r
        bh = b * n_heads + h
        m_base = mask_ptr + b * smb + (h % n_mask_heads) * smh
        for start_m in range(m_lo, q_len, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < q_len
            q_tile = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=q_tile, other=0.0)
            do = tl.load(do_ptr + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                         mask=q_tile, other=0.0)
            if UPCAST_DOT:
                q, do = q.to(tl.float32), do.to(tl.float32)
            lse = tl.load(lse_ptr + bh * q_len + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + bh * q_len + offs_m, mask=row_ok, other=0.0)
            p = _probs(q, k, offs_m, offs_n, row_ok, col_ok, lse, m_base, smm, smn, qk_scale, mask_floor,
                       HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, IEEE_DOT, BLOCK_M, BLOCK_N)
            dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE_DOT)
            dp = _dot(do, tl.trans(v), IEEE_DOT)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE_DOT)
    dk = dk * sm_scale
    tl.store(dk_ptr + b * sdkb + kvh * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(dk_ptr.dtype.element_ty), mask=kv_tile)
    tl.store(dv_ptr + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(dv_ptr.dtype.element_ty), mask=kv_tile)


@triton.jit
def flash_attention_bwd_dq_kernel(
    q_ptr, sqb, sqh, sqm, sqd,
    k_ptr, skb, skh, skn, skd,
    v_ptr, svb, svh, svn, svd,
    do_ptr, sdob, sdoh, sdom, sdod,
    lse_ptr, delta_ptr,
    mask_ptr, smb, smh, smm, smn, n_mask_heads,
    dq_ptr, sdqb, sdqh, sdqm, sdqd,
    n_heads, n_rep, q_len, kv_len, head_dim, qk_scale, sm_scale, mask_floor,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // n_rep
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    d_ok = offs_d < head_dim
    q_tile = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=q_tile, other=0.0)
    do = tl.load(do_ptr + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=q_tile, other=0.0)
    if UPCAST_DOT:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse = tl.load(lse_ptr + bh * q_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + bh * q_len + offs_m, mask=row_ok, other=0.0)
    m_base = mask_ptr + b * smb + (h % n_mask_heads) * smh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = kv_len
    if IS_CAUSAL:  # no key past this query block's diagonal
        hi = tl.minimum(kv_len, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < kv_len
        kv_tile = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_tile, other=0.0)
        v = tl.load(v_ptr + b * svb + kvh * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_tile, other=0.0)
        if UPCAST_DOT:
            k, v = k.to(tl.float32), v.to(tl.float32)
        p = _probs(q, k, offs_m, offs_n, row_ok, col_ok, lse, m_base, smm, smn, qk_scale, mask_floor,
                   HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, IEEE_DOT, BLOCK_M, BLOCK_N)
        dp = _dot(do, tl.trans(v), IEEE_DOT)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE_DOT)
    dq = dq * sm_scale
    tl.store(dq_ptr + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(dq_ptr.dtype.element_ty), mask=q_tile)


def _blocks(head_dim: int, dtype: torch.dtype, device: torch.device):
    if device.type != "cuda":  # the interpreter: small tiles keep tests fast
        return 16, 16, 4, 1
    # fp32 tiles are twice the bytes: 64-wide fp32 tiles at head_dim 128 asked for
    # 246-295 KB of shared memory on the H200 (limit 227 KB), so they get half the width
    wide = head_dim <= 128 and dtype.itemsize <= 2
    block = 64 if wide else 32
    return block, block, 4, 2


def flash_attention_backward(grad_out, q, k, v, out, lse, mask, scale: float, is_causal: bool):
    """Gradients of ``flash_attention`` for (q, k, v): dq laid out like the forward's
    output, dk / dv like k / v's (B, S, Hkv, D) projection layout."""
    bsz, n_heads, q_len, head_dim = q.shape
    n_kv, kv_len = k.shape[1], k.shape[2]
    n_rep = n_heads // n_kv
    dq, dk, dv = empty_heads_like(q), empty_heads_like(k), empty_heads_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # (B, H, Q)
    lse = lse.contiguous()
    n_mask_heads, mask_floor = 1, 0.0
    if mask is not None:
        mask, n_mask_heads, mask_floor = _expand_mask(mask, bsz, n_heads, q_len, kv_len)
    mask_args = (mask if mask is not None else q, *(mask.stride() if mask is not None else (0, 0, 0, 0)), n_mask_heads)
    block_m, block_n, warps, stages = _blocks(head_dim, q.dtype, q.device)
    flags = dict(
        HAS_MASK=mask is not None, MASK_IS_BOOL=mask is not None and mask.dtype == torch.bool,
        IS_CAUSAL=bool(is_causal), IEEE_DOT=q.dtype == torch.float32 or interpreting(),
        UPCAST_DOT=interpreting() and q.dtype != torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(head_dim)),
        num_warps=warps, num_stages=stages,
    )
    common = (q, *q.stride(), k, *k.stride(), v, *v.stride(), grad_out, *grad_out.stride(), lse, delta, *mask_args)
    qk_scale = float(scale) * LOG2E
    flash_attention_bwd_dkdv_kernel[(triton.cdiv(kv_len, block_n), bsz * n_kv)](
        *common, dk, *dk.stride(), dv, *dv.stride(),
        n_heads, n_kv, n_rep, q_len, kv_len, head_dim, qk_scale, float(scale), float(mask_floor), **flags,
    )
    flash_attention_bwd_dq_kernel[(triton.cdiv(q_len, block_m), bsz * n_heads)](
        *common, dq, *dq.stride(),
        n_heads, n_rep, q_len, kv_len, head_dim, qk_scale, float(scale), float(mask_floor), **flags,
    )
    return dq, dk, dv
