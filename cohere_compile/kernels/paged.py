"""Paged KV cache kernels: write a step's K/V into pool slots, and split-K decode attention.

Pool layout per layer: ``(num_blocks, Hkv, block_size, D)``, so one KV head's keys of one
block are a contiguous ``block_size x D`` tile. A block table row maps a sequence's
logical block ``i`` (positions ``i*block_size ..``) to a pool block.

Decode attention (one query token per sequence) is flash-decoding: a program owns all
``G = H / Hkv`` query heads of one KV head (so each key is read once for its whole group)
and one split of one sequence's positions; splits are sized from the sequences' lengths on
the device, so a ragged batch's programs get even work; a second kernel merges the splits'
partial softmax states.
"""

import torch
import triton
import triton.language as tl

from . import interpreting, next_pow2
from .pdl import launch_options, wait_then_release

LOG2E = 1.4426950408889634


@triton.jit
def paged_kv_write_kernel(
    k_ptr, v_ptr, skb, skh, skt, skd, svb, svh, svt, svd,
    kpool_ptr, vpool_ptr, spn, sph, sps,
    slots_ptr, T, block_size,
    D: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    wait_then_release(PDL)
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
        D=d, BLOCK_D=next_pow2(d), **launch_options(k.device),
    )


@triton.jit
def _split_plan(lens_ptr, n_seqs, n_slots, fixed_chunk, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """How the ``n_slots`` programs of a KV head share the work, from the sequences' lengths
    (read on the device, so one CUDA graph serves every step): each split covers ``chunk``
    tiles of one sequence; returns (lengths, chunk, splits per sequence, index of each
    sequence's first split), the last three over sequences. ``fixed_chunk > 0`` fixes the
    chunk; otherwise it is the total tiles over the spare slots, so that long sequences get
    proportionally more splits and sum(splits) <= n_slots."""
    i = tl.arange(0, BLOCK_B)
    lens = tl.load(lens_ptr + i, mask=i < n_seqs, other=0)
    tiles = (lens + BLOCK_N - 1) // BLOCK_N
    spare = n_slots - n_seqs
    # sum_b ceil(tiles_b / chunk) <= total / chunk + n_seqs <= spare + n_seqs = n_slots
    balanced = tl.where(spare > 0, (tl.sum(tiles, 0) + spare - 1) // tl.maximum(spare, 1), tl.max(tiles, 0))
    chunk = tl.maximum(tl.where(fixed_chunk > 0, fixed_chunk, balanced), 1)
    splits = (tiles + chunk - 1) // chunk
    first = tl.cumsum(splits, 0) - splits
    return lens, chunk, splits, first


@triton.jit
def paged_decode_kernel(
    q_ptr, sqb, sqh, sqd,
    kpool_ptr, vpool_ptr, spn, sph, sps,
    table_ptr, stb, lens_ptr,
    mask_ptr, smb, smh, smn, mask_floor,
    part_o_ptr, part_ml_ptr,
    n_seqs, n_kv_heads, group, n_slots, fixed_chunk, scale,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_SIZE: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (slot, KV head): split ``slot - first[b]`` of the sequence b whose splits
    include ``slot`` (slots past the last split do nothing)."""
    wait_then_release(PDL)
    slot = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    lens, chunk, splits, first = _split_plan(lens_ptr, n_seqs, n_slots, fixed_chunk, BLOCK_N, BLOCK_B)
    seq = tl.arange(0, BLOCK_B)
    b_raw = tl.sum((first + splits <= slot).to(tl.int32), 0)  # sequences that end before this slot
    used = b_raw < n_seqs
    b_raw = tl.minimum(b_raw, n_seqs - 1)
    b = b_raw.to(tl.int64)
    kv_len = tl.sum(tl.where(seq == b_raw, lens, 0), 0)
    s = slot - tl.sum(tl.where(seq == b_raw, first, 0), 0)
    start = tl.where(used, s * chunk * BLOCK_N, 0)
    end = tl.where(used, tl.minimum(start + chunk * BLOCK_N, kv_len), 0)

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

    part = (slot * n_kv_heads + hk) * BLOCK_G + g
    # only the group's real heads: BLOCK_G is at least 16 (the tensor-core tile), and with
    # Aya's 4 heads per KV head the padding rows would be 3/4 of these fp32 writes
    keep = g_ok & used
    tl.store(part_o_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=keep[:, None])
    tl.store(part_ml_ptr + part * 2, m_i, mask=keep)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=keep)


@triton.jit
def paged_merge_kernel(
    part_o_ptr, part_ml_ptr, out_ptr, sob, soh, sod, lens_ptr,
    n_seqs, n_kv_heads, group, n_slots, fixed_chunk,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    """Combine the splits of one query head (the same plan as the decode kernel's, recomputed);
    a head that saw no visible key (or a sequence of length 0) gets zeros."""
    wait_then_release(PDL)
    bh = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    b = bh // n_kv_heads
    hk = bh % n_kv_heads
    _, _, splits, first = _split_plan(lens_ptr, n_seqs, n_slots, fixed_chunk, BLOCK_N, BLOCK_B)
    seq = tl.arange(0, BLOCK_B)
    n_splits = tl.sum(tl.where(seq == b, splits, 0), 0)
    first_slot = tl.sum(tl.where(seq == b, first, 0), 0)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    m_run = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
    l_run = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
    o_run = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        s_ok = s0 + s < n_splits
        part = ((first_slot + s0 + s) * n_kv_heads + hk) * BLOCK_G + g
        m = tl.load(part_ml_ptr + part * 2, mask=s_ok, other=float("-inf"))
        l = tl.load(part_ml_ptr + part * 2 + 1, mask=s_ok, other=0.0)
        o = tl.load(part_o_ptr + part[:, None] * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_safe)
        w = tl.exp2(m - m_safe)
        l_run = l_run * alpha + tl.sum(l * w, 0)
        o_run = o_run * alpha + tl.sum(o * w[:, None], 0)
        m_run = m_new
    o = tl.where(l_run > 0, o_run / tl.where(l_run > 0, l_run, 1.0), 0.0)
    head = hk * group + g
    tl.store(out_ptr + b * sob + head * soh + d * sod, o.to(out_ptr.dtype.element_ty), mask=d < D)


def _n_slots(batch: int, kv_heads: int, view_tiles: int, target_programs: int) -> int:
    """Split slots per KV head: one per sequence plus ``target_programs / kv_heads`` to share
    out by length, but never more than there are tiles. Splits follow the sequences'
    real lengths (``_split_plan``), so a ragged batch's programs all get about the same work,
    and slots no split needs exit at once; an oversized view (a cache built for longer
    sequences) no longer stretches every split. H200 sweep, Aya heads, kernel alone
    (bench/results/paged_kernel_sweep_balanced.json): 1024 programs and 3 stages first, 49.3 vs
    50.0 us for the earlier plan on the ragged batch of 32 (70% vs 69% of copy), 6.16 vs 6.44 us
    at batch 1: about even, the balance is not what holds the kernel at 70%."""
    return max(1, min(batch * view_tiles, batch + triton.cdiv(target_programs, kv_heads)))


def paged_decode_attention(q, k_pool, v_pool, block_table, kv_lens, mask, scale, out, *,
                           block_n: int = 64, num_warps: int = 4, num_stages: int = 3, target_programs: int = 1024,
                           balance: bool = True):
    """q: (B, H, 1, D) -> out (B, H, 1, D). Attends positions [0, kv_lens[b]) of each sequence.
    The keyword knobs are for tuning sweeps (bench/paged_kernel.py); ``balance=False`` is the
    earlier plan (the same split length for every sequence, sized by the view, not the lengths)."""
    b, h, _, d = q.shape
    _, hkv, block_size, _ = k_pool.shape
    group = h // hkv
    view_len = block_table.shape[1] * block_size
    block_n = min(block_n, block_size)
    if block_size % block_n:
        raise ValueError(f"paged attention: block_size {block_size} must be a multiple of {block_n} or smaller")
    view_tiles = triton.cdiv(view_len, block_n)
    if balance:
        n_slots, fixed_chunk = _n_slots(b, hkv, view_tiles, target_programs), 0
    else:
        per_seq = max(1, min(view_tiles, triton.cdiv(target_programs, b * hkv)))
        fixed_chunk = triton.cdiv(view_tiles, per_seq)
        n_slots = b * triton.cdiv(view_tiles, fixed_chunk)
    block_g = max(16, next_pow2(group))
    block_d = next_pow2(d)
    block_b = next_pow2(b)
    part_o = torch.empty((n_slots * hkv * block_g, block_d), dtype=torch.float32, device=q.device)
    part_ml = torch.empty((n_slots * hkv * block_g, 2), dtype=torch.float32, device=q.device)
    if mask is None:
        mask_args = (q, 0, 0, 0, 0.0)
    else:
        floor = 0.0 if mask.dtype == torch.bool else torch.finfo(mask.dtype).min / 2
        mask_args = (mask, mask.stride(0), mask.stride(1) if mask.shape[1] > 1 else 0, mask.stride(3), floor)
    paged_decode_kernel[(n_slots, hkv)](
        q, q.stride(0), q.stride(1), q.stride(3),
        k_pool, v_pool, k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        block_table, block_table.stride(0), kv_lens,
        *mask_args,
        part_o, part_ml,
        b, hkv, group, n_slots, fixed_chunk, scale,
        HAS_MASK=mask is not None, MASK_IS_BOOL=mask is not None and mask.dtype == torch.bool,
        D=d, BLOCK_D=block_d, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_B=block_b, BLOCK_SIZE=block_size,
        UPCAST_DOT=interpreting() and q.dtype != torch.float32,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 in, fp32 exact (no TF32)
        num_warps=num_warps, num_stages=num_stages, **launch_options(q.device),
    )
    paged_merge_kernel[(b * hkv, group)](
        part_o, part_ml, out, out.stride(0), out.stride(1), out.stride(3), kv_lens,
        b, hkv, group, n_slots, fixed_chunk,
        D=d, BLOCK_D=block_d, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_B=block_b,
        BLOCK_S=min(16, next_pow2(n_slots)), **launch_options(q.device),
    )
    return out
