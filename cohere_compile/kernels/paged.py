"""Paged KV cache kernels: write a step's K/V into pool slots, and split-K decode attention.

Pool layout per layer: ``(num_blocks, Hkv, block_size, D)``, so one KV head's keys of one
block are a contiguous ``block_size x D`` tile. A block table row maps a sequence's
logical block ``i`` (positions ``i*block_size ..``) to a pool block.

Decode attention (one query token per sequence) is flash-decoding: program
``(b*Hkv + h, s)`` owns all ``G = H / Hkv`` query heads of KV head ``h`` (so each key
is read once for its whole group) and the positions of split ``s``; a second kernel
merges the splits' partial softmax states.
"""

import torch
import triton
import triton.language as tl

from . import interpreting, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def paged_kv_write_kernel(
    k_ptr, v_ptr, skb, skh, skt, skd, svb, svh, svt, svd,
    kpool_ptr, vpool_ptr, spn, sph, sps,
    slots_ptr, T, block_size,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = bt // T
    t = bt % T
    slot = tl.load(slots_ptr + bt).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        kv = tl.load(k_ptr + b * skb + h * skh + t * skt + d * skd, mask=dm)
        vv = tl.load(v_ptr + b * svb + h * svh + t * svt + d * svd, mask=dm)
        dst = blk * spn + h * sph + off * sps + d
        tl.store(kpool_ptr + dst, kv.to(kpool_ptr.dtype.element_ty), mask=dm)
        tl.store(vpool_ptr + dst, vv.to(vpool_ptr.dtype.element_ty), mask=dm)


def paged_kv_write(k_pool, v_pool, k, v, slots) -> None:
    """k, v: (B, Hkv, T, D); slots: (B, T) flat pool slots (block * block_size + offset), -1 = skip."""
    b, hkv, t, d = k.shape
    slots = slots.reshape(-1).contiguous()
    if b * t == 0:
        return
    paged_kv_write_kernel[(b * t, hkv)](
        k, v, *k.stride(), *v.stride(),
        k_pool, v_pool, k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        slots, t, k_pool.shape[2],
        D=d, BLOCK_D=next_pow2(d),
    )


@triton.jit
def paged_decode_kernel(
    q_ptr, sqb, sqh, sqd,
    kpool_ptr, vpool_ptr, spn, sph, sps,
    table_ptr, stb, lens_ptr,
    mask_ptr, smb, smh, smn, mask_floor,
    part_o_ptr, part_ml_ptr,
    n_kv_heads, group, n_splits, split_len, scale,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    b = bh // n_kv_heads
    hk = bh % n_kv_heads
    kv_len = tl.load(lens_ptr + b)
    start = s * split_len
    end = tl.minimum(start + split_len, kv_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < group
    d_ok = d < D
    heads = hk * group + g
    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + d[None, :] * sqd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    qk_scale = scale * 1.4426950408889634

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + n
        ok = pos < end
        page = tl.load(table_ptr + b * stb + n0 // BLOCK_SIZE).to(tl.int64)
        base = page * spn + hk * sph + (pos % BLOCK_SIZE)[:, None] * sps + d[None, :]
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(kpool_ptr + base, mask=kv_ok, other=0.0)
        v = tl.load(vpool_ptr + base, mask=kv_ok, other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = g_ok[:, None] & ok[None, :]
        if HAS_MASK:
            mv = tl.load(mask_ptr + b * smb + heads[:, None] * smh + pos[None, :] * smn,
                         mask=visible, other=0)
            if MASK_IS_BOOL:
                visible = visible & (mv != 0)
            else:
                mf = mv.to(tl.float32)
                visible = visible & (mf > mask_floor)
                scores += tl.where(visible, mf, 0.0) * 1.4426950408889634
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # rows that have seen nothing visible yet keep m = -inf: use 0 as the shift then
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    part = (bh * BLOCK_G + g) * n_splits + s
    # only the group's real heads: BLOCK_G is at least 16 (the tensor-core tile), and with
    # Aya's 4 heads per KV head the padding rows would be 3/4 of these fp32 writes
    tl.store(part_o_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None])
    tl.store(part_ml_ptr + part * 2, m_i, mask=g_ok)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=g_ok)


@triton.jit
def paged_merge_kernel(
    part_o_ptr, part_ml_ptr, out_ptr, sob, soh, sod,
    n_kv_heads, group, n_splits,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Combine the splits of one query head; a head that saw no visible key gets zeros."""
    bh = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    b = bh // n_kv_heads
    hk = bh % n_kv_heads
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < n_splits
    part = (bh * BLOCK_G + g) * n_splits + s
    m = tl.load(part_ml_ptr + part * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe)
    l_tot = tl.sum(l * w, 0)
    o = tl.load(part_o_ptr + part[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
    o = tl.sum(o * w[:, None], 0)
    o = tl.where(l_tot > 0, o / tl.where(l_tot > 0, l_tot, 1.0), 0.0)
    head = hk * group + g
    tl.store(out_ptr + b * sob + head * soh + d * sod, o.to(out_ptr.dtype.element_ty), mask=d < D)


def _n_splits(batch_kv_heads: int, view_len: int, block_n: int, target_programs: int = 1024) -> int:
    """Splits per (sequence, KV head). Sequences are usually shorter than the view, so
    splits past a sequence's end exit at once: aim for ~1024 programs in all, so the
    ones with work still fill 132 SMs with enough loads in flight, but never a split
    shorter than one tile. The H200 sweep (bench/results/paged_kernel_sweep.json) put
    1024 programs and 2 stages first: 51.3 vs 56.8 us (2.85 vs 2.57 TB/s) on the ragged
    batch of 32, equal at batch 1."""
    tiles = triton.cdiv(view_len, block_n)
    return max(1, min(tiles, triton.cdiv(target_programs, batch_kv_heads)))


def paged_decode_attention(q, k_pool, v_pool, block_table, kv_lens, mask, scale, out, *,
                           block_n: int = 64, num_warps: int = 4, num_stages: int = 2, target_programs: int = 1024):
    """q: (B, H, 1, D) -> out (B, H, 1, D). Attends positions [0, kv_lens[b]) of each sequence.
    The keyword knobs are for tuning sweeps (bench/paged_kernel.py)."""
    b, h, _, d = q.shape
    _, hkv, block_size, _ = k_pool.shape
    group = h // hkv
    view_len = block_table.shape[1] * block_size
    block_n = min(block_n, block_size)
    if block_size % block_n:
        raise ValueError(f"paged attention: block_size {block_size} must be a multiple of {block_n} or smaller")
    n_splits = _n_splits(b * hkv, view_len, block_n, target_programs)
    split_len = triton.cdiv(triton.cdiv(view_len, n_splits), block_n) * block_n
    n_splits = triton.cdiv(view_len, split_len)
    block_g = max(16, next_pow2(group))
    block_d = next_pow2(d)
    part_o = torch.empty((b * hkv * block_g * n_splits, block_d), dtype=torch.float32, device=q.device)
    part_ml = torch.empty((b * hkv * block_g * n_splits, 2), dtype=torch.float32, device=q.device)
    if mask is None:
        mask_args = (q, 0, 0, 0, 0.0)
    else:
        floor = 0.0 if mask.dtype == torch.bool else torch.finfo(mask.dtype).min / 2
        mask_args = (mask, mask.stride(0), mask.stride(1) if mask.shape[1] > 1 else 0, mask.stride(3), floor)
    paged_decode_kernel[(b * hkv, n_splits)](
        q, q.stride(0), q.stride(1), q.stride(3),
        k_pool, v_pool, k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        block_table, block_table.stride(0), kv_lens,
        *mask_args,
        part_o, part_ml,
        hkv, group, n_splits, split_len, scale,
        HAS_MASK=mask is not None, MASK_IS_BOOL=mask is not None and mask.dtype == torch.bool,
        D=d, BLOCK_D=block_d, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        UPCAST_DOT=interpreting() and q.dtype != torch.float32,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 in, fp32 exact (no TF32)
        num_warps=num_warps, num_stages=num_stages,
    )
    paged_merge_kernel[(b * hkv, group)](
        part_o, part_ml, out, out.stride(0), out.stride(1), out.stride(3),
        hkv, group, n_splits,
        D=d, BLOCK_D=block_d, BLOCK_G=block_g, BLOCK_S=next_pow2(n_splits),
    )
    return out
