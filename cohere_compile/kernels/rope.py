"""Cohere's interleaved RoPE, optionally preceded by the per-head QK LayerNorm.

One launch handles q and k together: program ``(p, c)`` owns token ``(b, t)`` and rotates
chunk ``c`` of its heads (the query heads' chunks first, then the key heads'). Prefill has
many tokens, so a chunk is all query (or all key) heads; a decode step has a handful, so
there chunks shrink (down to one head) until the launch has about two programs per SM (at
batch 1 the step's 40 Aya heads run as 40 programs rather than one: a single program
rotating every head of the token was slower on the H200 than the two Inductor kernels it
replaced).

RoPE pairs neighbouring elements ``(2i, 2i+1)`` (``repeat_interleave`` frequencies, not
Llama's half split), so each element is combined with its partner at index ``d ^ 1``.

Rounding follows the eager model: the normed head is rounded to the input dtype
before it is upcast again for the rotation, and the result is rounded once.
"""

import torch
import triton
import triton.language as tl

from . import empty_heads_like, next_pow2
from .pdl import launch_options, wait_then_release


@triton.jit
def _rotate_heads(
    x_ptr, sxb, sxh, sxt, sxd,
    o_ptr, sob, soh, sot,
    w_ptr, cos, sin, b, t, h0, n_heads, head_dim, eps,
    HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Heads ``h0 .. h0 + BLOCK_H`` of token ``(b, t)``."""
    h = h0 + tl.arange(0, BLOCK_H)[:, None]
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
    v_ptr, svb, svh, svt, svd,
    kpool_ptr, vpool_ptr, spn, sph, sps, slots_ptr, block_size,
    qw_ptr, kw_ptr,
    cos_ptr, sin_ptr, scb, sct, scd,
    seq_len, n_q_heads, n_k_heads, head_dim, q_eps, k_eps,
    HAS_NORM: tl.constexpr, WRITE_KV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    """``WRITE_KV``: the rotated keys and the values go straight to their pool slot
    (``paged.paged_kv_write``'s layout) instead of to a k output (the ``v`` / pool / slot
    arguments are unused otherwise)."""
    wait_then_release(PDL)
    pid = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    q_chunks = tl.cdiv(n_q_heads, BLOCK_HQ)
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_D)[None, :]
    d_valid = d < head_dim
    cos = tl.load(cos_ptr + b * scb + t * sct + d * scd, mask=d_valid, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * scb + t * sct + d * scd, mask=d_valid, other=0.0).to(tl.float32)
    if chunk < q_chunks:
        _rotate_heads(q_ptr, sqb, sqh, sqt, sqd, qo_ptr, sqob, sqoh, sqot, qw_ptr, cos, sin,
                      b, t, chunk * BLOCK_HQ, n_q_heads, head_dim, q_eps, HAS_NORM, BLOCK_HQ, BLOCK_D)
    else:
        h0 = (chunk - q_chunks) * BLOCK_HK
        if WRITE_KV:
            slot = tl.load(slots_ptr + pid).to(tl.int64)
            if slot >= 0:  # -1: an idle batch row, nothing to store
                dst = (slot // block_size) * spn + (slot % block_size) * sps
                # the pool slot as an output with no batch / token strides
                _rotate_heads(k_ptr, skb, skh, skt, skd, kpool_ptr + dst, 0, sph, 0, kw_ptr, cos, sin,
                              b, t, h0, n_k_heads, head_dim, k_eps, HAS_NORM, BLOCK_HK, BLOCK_D)
                h = h0 + tl.arange(0, BLOCK_HK)[:, None]
                valid = (h < n_k_heads) & d_valid
                vv = tl.load(v_ptr + b * svb + t * svt + h * svh + d * svd, mask=valid)
                tl.store(vpool_ptr + dst + h * sph + d, vv.to(vpool_ptr.dtype.element_ty), mask=valid)
        else:
            _rotate_heads(k_ptr, skb, skh, skt, skd, ko_ptr, skob, skoh, skot, kw_ptr, cos, sin,
                          b, t, h0, n_k_heads, head_dim, k_eps, HAS_NORM, BLOCK_HK, BLOCK_D)


def _heads_per_program(tokens: int, heads: int, target_programs: int) -> int:
    """The largest power-of-two head chunk that still gives ``target_programs`` programs (or one head)."""
    per = next_pow2(heads)
    while per > 1 and tokens * triton.cdiv(heads, per) < target_programs:
        per //= 2
    return per


def _target_programs(x) -> int:
    if x.device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
    return 1  # the CPU interpreter runs programs one by one: fewest programs, fastest tests


def _launch(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out=None, write=None, target_programs=None,
            k_eps=None):
    """Programs per (token, head chunk), see the module docstring (``target_programs``: the
    device's default unless given). ``k_out`` receives the rotated k, or ``write = (v, k_pool,
    v_pool, slots)`` stores it and v in the pools. ``k_eps``: k's norm epsilon when it is not q's."""
    bsz, n_q, seq, dim = q.shape
    n_k = k.shape[1]
    target = _target_programs(q) if target_programs is None else target_programs
    block_hq, block_hk = (_heads_per_program(bsz * seq, n, target) for n in (n_q, n_k))
    chunks = triton.cdiv(n_q, block_hq) + triton.cdiv(n_k, block_hk)
    has_norm = q_weight is not None
    if has_norm:
        q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
    cos = cos.expand(bsz, seq, dim)
    sin = sin.expand(bsz, seq, dim)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if write is None:
        v, k_pool, v_pool, slots = q, q, q, q  # unused (WRITE_KV=False)
        ko = (k_out, *k_out.stride()[:3])
    else:
        v, k_pool, v_pool, slots = write
        slots = slots.reshape(-1).contiguous()
        ko = (q_out, 0, 0, 0)  # unused
    if bsz * seq:
        qk_norm_rope_kernel[(bsz * seq, chunks)](
            q, *q.stride(), k, *k.stride(),
            q_out, *q_out.stride()[:3], *ko,
            v, *v.stride(),
            k_pool, v_pool, k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), slots, k_pool.shape[2],
            q_weight if has_norm else q, k_weight if has_norm else k,
            cos, sin, *cos.stride(),
            seq, n_q, n_k, dim, float(eps), float(eps if k_eps is None else k_eps),
            HAS_NORM=has_norm, WRITE_KV=write is not None, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
            BLOCK_D=next_pow2(dim), num_warps=4 if max(block_hq, block_hk) > 2 else 1,  # one-head chunks: one warp
            **launch_options(q.device),
        )


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, target_programs=None, k_eps=None):
    """q: (B, Hq, T, D), k: (B, Hk, T, D) (any strides); cos/sin: (B|1, T, D).
    Weights (Hq, D) / (Hk, D) or both None (RoPE only); ``k_eps`` defaults to ``eps``.
    Returns rotated (q, k)."""
    q_out, k_out = empty_heads_like(q), empty_heads_like(k)
    _launch(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out=k_out, target_programs=target_programs,
            k_eps=k_eps)
    return q_out, k_out


def qk_norm_rope_kv_write(q, k, v, q_weight, k_weight, cos, sin, eps, k_pool, v_pool, slots, target_programs=None):
    """``qk_norm_rope`` on q and k in the same launch as the paged cache write of the rotated k
    and of v at ``slots`` (B, T), as ``paged.paged_kv_write`` stores them. Returns the rotated q."""
    q_out = empty_heads_like(q)
    _launch(q, k, q_weight, k_weight, cos, sin, eps, q_out, write=(v, k_pool, v_pool, slots),
            target_programs=target_programs)
    return q_out


# ---------------------------------------------------------------- backward


@triton.jit
def _unrotate_heads(
    g_ptr, sgb, sgh, sgt, sgd,
    x_ptr, sxb, sxh, sxt, sxd,
    dx_ptr, sdb, sdh, sdt,
    w_ptr, dw_acc, cos, sin_partner, b, t, n_heads, head_dim, eps,
    HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """RoPE backward (the rotation by -theta: out[d^1] holds +-x[d] sin[d^1]), then the
    per-head norm backward with mean/rstd recomputed from x. Returns dw_acc + dn * xhat."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    valid = (h < n_heads) & (d < head_dim)
    g_row = g_ptr + b * sgb + t * sgt + h * sgh
    g = tl.load(g_row + d * sgd, mask=valid, other=0.0).to(tl.float32)
    g_partner = tl.load(g_row + (d ^ 1) * sgd, mask=valid, other=0.0).to(tl.float32)
    sign = tl.where((d % 2) == 0, 1.0, -1.0)
    dn = g * cos + (sign * g_partner) * sin_partner
    if HAS_NORM:
        dn = dn.to(dx_ptr.dtype.element_ty).to(tl.float32)  # eager rounds at the norm's output cast
        x = tl.load(x_ptr + b * sxb + t * sxt + h * sxh + d * sxd, mask=valid, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / head_dim
        centred = tl.where(valid, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / head_dim + eps)
        xhat = centred * rstd[:, None]
        w = tl.load(w_ptr + h * head_dim + d, mask=valid, other=0.0).to(tl.float32)
        dxhat = dn * w
        c1 = tl.sum(xhat * dxhat, axis=1) / head_dim
        c2 = tl.sum(dxhat, axis=1) / head_dim
        dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        dw_acc += dn * xhat
    else:
        dx = dn
    tl.store(dx_ptr + b * sdb + t * sdt + h * sdh + d, dx.to(dx_ptr.dtype.element_ty), mask=valid)
    return dw_acc


@triton.jit
def qk_norm_rope_backward_kernel(
    gq_ptr, sgqb, sgqh, sgqt, sgqd,
    gk_ptr, sgkb, sgkh, sgkt, sgkd,
    q_ptr, sqb, sqh, sqt, sqd,
    k_ptr, skb, skh, skt, skd,
    dq_ptr, sdqb, sdqh, sdqt,
    dk_ptr, sdkb, sdkh, sdkt,
    qw_ptr, kw_ptr, dqw_part_ptr, dkw_part_ptr,
    cos_ptr, sin_ptr, scb, sct, scd,
    n_tokens, tokens_per_program, seq_len, n_q_heads, n_k_heads, head_dim, q_eps, k_eps,
    HAS_NORM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Each program owns a contiguous run of tokens and writes one fp32 partial of each
    weight gradient (summed over its tokens), reduced on the host."""
    pid = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    d_valid = d < head_dim
    dwq = tl.zeros([BLOCK_HQ, BLOCK_D], tl.float32)
    dwk = tl.zeros([BLOCK_HK, BLOCK_D], tl.float32)
    start = pid * tokens_per_program
    end = tl.minimum(start + tokens_per_program, n_tokens)
    for tok in range(start, end):
        b = tok // seq_len
        t = tok % seq_len
        cos = tl.load(cos_ptr + b * scb + t * sct + d * scd, mask=d_valid, other=0.0).to(tl.float32)
        sin_p = tl.load(sin_ptr + b * scb + t * sct + (d ^ 1) * scd, mask=d_valid, other=0.0).to(tl.float32)
        dwq = _unrotate_heads(gq_ptr, sgqb, sgqh, sgqt, sgqd, q_ptr, sqb, sqh, sqt, sqd,
                              dq_ptr, sdqb, sdqh, sdqt, qw_ptr, dwq, cos, sin_p, b, t,
                              n_q_heads, head_dim, q_eps, HAS_NORM, BLOCK_HQ, BLOCK_D)
        dwk = _unrotate_heads(gk_ptr, sgkb, sgkh, sgkt, sgkd, k_ptr, skb, skh, skt, skd,
                              dk_ptr, sdkb, sdkh, sdkt, kw_ptr, dwk, cos, sin_p, b, t,
                              n_k_heads, head_dim, k_eps, HAS_NORM, BLOCK_HK, BLOCK_D)
    if HAS_NORM:
        hq = tl.arange(0, BLOCK_HQ)[:, None]
        hk = tl.arange(0, BLOCK_HK)[:, None]
        tl.store(dqw_part_ptr + pid * n_q_heads * head_dim + hq * head_dim + d, dwq,
                 mask=(hq < n_q_heads) & d_valid)
        tl.store(dkw_part_ptr + pid * n_k_heads * head_dim + hk * head_dim + d, dwk,
                 mask=(hk < n_k_heads) & d_valid)


def qk_norm_rope_backward(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps, k_eps=None):
    """Backward of ``qk_norm_rope`` (``k_eps`` defaults to ``eps``). Returns ``(dq, dk, dq_weight, dk_weight)``; the
    weight grads are None without QK norm. dq / dk are laid out (B, T, H, D)."""
    bsz, n_q, seq, dim = q.shape
    n_k = k.shape[1]
    dq, dk = empty_heads_like(q), empty_heads_like(k)
    has_norm = q_weight is not None
    cos = cos.expand(bsz, seq, dim)
    sin = sin.expand(bsz, seq, dim)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    tokens = bsz * seq
    if tokens == 0:
        zeros = (torch.zeros_like(q_weight), torch.zeros_like(k_weight)) if has_norm else (None, None)
        return dq, dk, *zeros
    if q.device.type == "cuda":
        programs = min(tokens, 4 * torch.cuda.get_device_properties(q.device).multi_processor_count)
    else:
        programs = min(tokens, 4)  # the interpreter: few programs, fast tests
    per_program = triton.cdiv(tokens, programs)
    programs = triton.cdiv(tokens, per_program)
    if has_norm:
        q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
        dqw = torch.empty((programs, n_q, dim), dtype=torch.float32, device=q.device)
        dkw = torch.empty((programs, n_k, dim), dtype=torch.float32, device=q.device)
    else:
        dqw = dkw = q_weight = k_weight = dq
    qk_norm_rope_backward_kernel[(programs,)](
        grad_q, *grad_q.stride(), grad_k, *grad_k.stride(),
        q, *q.stride(), k, *k.stride(),
        dq, *dq.stride()[:3], dk, *dk.stride()[:3],
        q_weight, k_weight, dqw, dkw,
        cos, sin, *cos.stride(),
        tokens, per_program, seq, n_q, n_k, dim, float(eps), float(eps if k_eps is None else k_eps),
        HAS_NORM=has_norm, BLOCK_HQ=next_pow2(n_q), BLOCK_HK=next_pow2(n_k),
        BLOCK_D=next_pow2(dim), num_warps=4,
    )
    if not has_norm:
        return dq, dk, None, None
    return dq, dk, dqw.sum(0).to(q_weight.dtype), dkw.sum(0).to(k_weight.dtype)
