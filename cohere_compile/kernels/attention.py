"""Flash attention forward with native GQA (no repeated K/V is ever built).

Program ``(m, b*H + h)`` owns ``BLOCK_M`` queries of head ``h`` and streams the key /
value blocks of KV head ``h // n_rep`` with an online softmax. An optional mask
(bool: True = attend, or additive float, broadcast over batch/heads by stride 0)
is read tile by tile; key blocks with nothing visible are skipped, which is
what makes a causal+padding mask cost about half the FLOPs of a dense one. A small
pre-pass (``mask_block_range_kernel``) finds, per query block, the range of key
blocks with anything visible, so the main loop runs branch-free over that range.

Masked entries count as ``-inf``: an additive value at or below half the mask
dtype's most negative number (HF writes ``finfo.min``) is masked. A query row with
no visible key returns zeros (HF eager would average V uniformly there: such rows
are padding whose outputs nobody reads).
"""

import torch
import triton
import triton.language as tl

from . import empty_heads_like, interpreting, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def mask_block_range_kernel(
    mask_ptr, smb, smh, smm, smn, range_ptr,
    n_mask_heads, q_len, kv_len, n_kblocks, mask_floor,
    MASK_IS_BOOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For each (query block, batch, mask head): the first and one-past-last key block
    holding any visible entry. The attention loop then runs over that range only,
    without a per-tile branch (which would stop Triton from pipelining the loop)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_mask_heads
    h = bh % n_mask_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    lo = n_kblocks
    hi = 0
    for kb in range(0, n_kblocks):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (offs_n < kv_len)[None, :]
        mv = tl.load(mask_ptr + b * smb + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=ok, other=0)
        if MASK_IS_BOOL:
            vis = ok & (mv != 0)
        else:
            vis = ok & (mv.to(tl.float32) > mask_floor)
        any_visible = tl.max(vis.to(tl.int32)) > 0
        lo = tl.where(any_visible & (lo == n_kblocks), kb, lo)
        hi = tl.where(any_visible, kb + 1, hi)
    out = range_ptr + (bh * tl.num_programs(0) + pid_m) * 2
    tl.store(out, lo)
    tl.store(out + 1, hi)


@triton.jit
def flash_attention_kernel(
    q_ptr, sqb, sqh, sqm, sqd,
    k_ptr, skb, skh, skn, skd,
    v_ptr, svb, svh, svn, svd,
    mask_ptr, smb, smh, smm, smn, range_ptr, n_mask_heads,
    o_ptr, sob, soh, som, sod, lse_ptr,
    n_heads, n_rep, q_len, kv_len, head_dim, qk_scale, mask_floor,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, STORE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    kvh = h // n_rep

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < q_len
    d_ok = offs_d < head_dim

    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST_DOT:  # Triton 3.6's interpreter mis-multiplies bf16/fp16 tl.dot operands
        q = q.to(tl.float32)
    k_base = k_ptr + b * skb + kvh * skh
    v_base = v_ptr + b * svb + kvh * svh
    m_base = mask_ptr + b * smb + (h % n_mask_heads) * smh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo = 0
    hi = tl.cdiv(kv_len, BLOCK_N)
    if IS_CAUSAL:  # no key block past this query block's diagonal
        hi = tl.minimum(hi, tl.cdiv((pid_m + 1) * BLOCK_M, BLOCK_N))
    if HAS_MASK:
        rng = range_ptr + ((b * n_mask_heads + h % n_mask_heads) * tl.num_programs(0) + pid_m) * 2
        lo = tl.maximum(lo, tl.load(rng))
        hi = tl.minimum(hi, tl.load(rng + 1))
    for start_n in range(lo * BLOCK_N, hi * BLOCK_N, BLOCK_N):
        offs_n = start_n + offs_n0
        visible = row_ok[:, None] & (offs_n < kv_len)[None, :]
        if IS_CAUSAL:  # top-left aligned, like SDPA's is_causal
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
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=(offs_n < kv_len)[None, :] & d_ok[:, None], other=0.0)
        if UPCAST_DOT:
            kt = kt.to(tl.float32)
        if IEEE_DOT:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = tl.where(visible, s * qk_scale + bias, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=(offs_n < kv_len)[:, None] & d_ok[None, :], other=0.0)
        p = p.to(v.dtype)  # eager also rounds probabilities to the value dtype
        if UPCAST_DOT:
            p, v = p.to(tl.float32), v.to(tl.float32)
        if IEEE_DOT:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p, v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if STORE_LSE:  # log-sum-exp of the log2-scaled scores, for the backward; -inf: nothing visible
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(lse_ptr + bh * q_len + offs_m, lse, mask=row_ok)
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _blocks(q_len: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    if device.type != "cuda":  # the interpreter: small tiles keep tests fast
        return 16, 16, 4, 1
    if dtype.itemsize > 2:  # fp32 tiles at 128 x 64, 3 stages, need 246-295 KB of shared memory (H200: 227 KB)
        return (64 if q_len > 16 else 16), 32, 4, 2
    block_m = 128 if q_len > 64 else 64 if q_len > 16 else 16
    block_n = 64 if head_dim <= 128 else 32
    return block_m, block_n, 8 if block_m == 128 else 4, 3


def _expand_mask(mask, bsz, n_heads, q_len, kv_len):
    """-> (mask expanded to (B, 1|H, Q, K) by strides, its head count, its masked floor)."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    n_mask_heads = n_heads if mask.shape[1] != 1 else 1
    mask = mask.expand(bsz, n_mask_heads, q_len, kv_len)
    mask_floor = torch.finfo(mask.dtype).min / 2 if mask.dtype.is_floating_point else 0.0
    return mask, n_mask_heads, mask_floor


def flash_attention(q, k, v, mask, scale: float, is_causal: bool, return_lse: bool = False):
    """q: (B, H, Q, D); k, v: (B, Hkv, K, D) with H % Hkv == 0; mask broadcastable to
    (B, H, Q, K), bool or additive float. Returns (B, H, Q, D) laid out as (B, Q, H, D);
    with ``return_lse`` also the (B, H, Q) fp32 log-sum-exp (log2 units) the backward needs."""
    bsz, n_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    n_rep = n_heads // k.shape[1]
    out = empty_heads_like(q)
    lse = torch.empty((bsz, n_heads, q_len), dtype=torch.float32, device=q.device) if return_lse else q
    if out.numel() == 0:
        return (out, lse) if return_lse else out
    block_m, block_n, warps, stages = _blocks(q_len, head_dim, q.dtype, q.device)
    grid = (triton.cdiv(q_len, block_m), bsz * n_heads)
    ranges, n_mask_heads, mask_floor = q, 1, 0.0
    if mask is not None:
        mask, n_mask_heads, mask_floor = _expand_mask(mask, bsz, n_heads, q_len, kv_len)
        ranges = torch.empty((bsz * n_mask_heads, grid[0], 2), dtype=torch.int32, device=q.device)
        mask_block_range_kernel[(grid[0], bsz * n_mask_heads)](
            mask, *mask.stride(), ranges, n_mask_heads, q_len, kv_len, triton.cdiv(kv_len, block_n),
            float(mask_floor), MASK_IS_BOOL=mask.dtype == torch.bool, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=4,
        )
    flash_attention_kernel[grid](
        q, *q.stride(), k, *k.stride(), v, *v.stride(),
        mask if mask is not None else q, *(mask.stride() if mask is not None else (0, 0, 0, 0)),
        ranges, n_mask_heads,
        out, *out.stride(), lse,
        n_heads, n_rep, q_len, kv_len, head_dim, float(scale) * LOG2E,
        float(mask_floor),
        HAS_MASK=mask is not None, MASK_IS_BOOL=mask is not None and mask.dtype == torch.bool,
        IS_CAUSAL=bool(is_causal), IEEE_DOT=q.dtype == torch.float32 or interpreting(),
        UPCAST_DOT=interpreting() and q.dtype != torch.float32, STORE_LSE=return_lse,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(head_dim)),
        num_warps=warps, num_stages=stages,
    )
    return (out, lse) if return_lse else out
