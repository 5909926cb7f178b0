"""int4 weight-only GEMV for small M (decode): ``out[m, n] = sum_k x[m, k] * W[n, k]``.

Weight layout (see ``ops/int4.py``): ``packed`` uint8 ``[N, K // 2]``, byte ``j`` of a row holds
``q[2j]`` in its low nibble and ``q[2j + 1]`` in its high nibble; ``scales`` and ``zeros``
``[N, K // G]`` (G = group size along K). Dequantized weight (tinygemm's asymmetric math):
``W[n, k] = (q[n, k] - 8) * scales[n, k // G] + zeros[n, k // G]``.

One program owns ``BLOCK_N`` output features and one of ``SPLIT_K`` slices of K. Per K-chunk it
loads the bytes as a ``[BLOCK_N, BLOCK_K // G, G // 2]`` tile (rows contiguous along K), splits
the nibbles (as ``c = 1 + q / 16``, see ``_nibble_code``) and, for each of the M rows of x,
reduces in fp32 without materialising W:
``sum_k x W = sum_g 16 s_g * sum_{k in g} x c + (z_g - 24 s_g) * sum_{k in g} x``.
M is a compile-time constant (<= 16): x rows are few, so each gets a ``tl.sum`` (``tl.dot`` needs
16 rows). For M = 1 the default instead dequantizes element-wise and accumulates ``W * x`` in a
``[BLOCK_N, BLOCK_K]``-sized fp32 tile, reduced once after the K loop (``reduce_at_end``; no
cross-thread reduction per chunk). Which of the two is faster on the H200 is for
``bench/int4_gemv.py --sweep`` to say. With ``SPLIT_K > 1`` each slice writes fp32 partials
``[SPLIT_K, M, N]`` and a second pass (``torch.sum``) reduces them: deterministic, no atomics,
no memset. Row strides are arguments (not derived from K) so Triton knows their alignment and
reads the weights with 16-byte loads.
"""

import torch
import triton
import triton.language as tl

from . import next_pow2
from .pdl import launch_options, wait_then_release

MAX_M = 16  # the op takes dequantize + matmul above this (prefill); see ops/int4.py
TARGET_PROGRAMS = 512  # auto split-K aims for about this many programs (H200: 132 SMs, ~4 waves)


@triton.jit
def _nibble_code(q):
    """0..15 -> the fp32 ``1 + q / 16``, built from bits (q into the top of 1.0's mantissa): no
    int-to-float conversion, a quarter-rate instruction that would cap the kernel near half the
    H200's bandwidth. ``(q - 8) * s + z == (1 + q / 16) * 16 s + (z - 24 s)``: one FMA per weight."""
    return ((q.to(tl.int32) << 19) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _load_x_pairs(x_row, g_idx, g_ok, NG: tl.constexpr, GROUP: tl.constexpr):
    """x of groups ``g_idx`` as (even k, odd k) fp32 ``[NG, GROUP // 2]`` tiles, from one
    contiguous (vectorizable) load split in registers."""
    x = tl.load(x_row + g_idx[:, None] * GROUP + tl.arange(0, GROUP)[None, :], mask=g_ok[:, None], other=0.0)
    return tl.split(tl.reshape(x.to(tl.float32), (NG, GROUP // 2, 2)))


@triton.jit
def int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_on, stride_os,
                     CHUNKS_PER_SPLIT, M: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, REDUCE_AT_END: tl.constexpr, PDL: tl.constexpr):
    wait_then_release(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    NG: tl.constexpr = BLOCK_K // GROUP  # groups per chunk
    H: tl.constexpr = GROUP // 2  # bytes per group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, NG)
    offs_h = tl.arange(0, H)
    n_ok = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    k_groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if REDUCE_AT_END:  # M == 1: accumulate w * x element-wise, one cross-thread reduction at the end
        acc3 = tl.zeros((BLOCK_N, NG, H), dtype=tl.float32)
    # row strides as arguments (not K // 2): Triton then knows their alignment and vectorizes the loads
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * stride_wn
    sz_rows = offs_n.to(tl.int64)[:, None] * stride_sn
    chunk0 = pid_k * CHUNKS_PER_SPLIT
    for c in range(chunk0, chunk0 + CHUNKS_PER_SPLIT):
        g_idx = c * NG + offs_g  # group index along K
        g_ok = g_idx < k_groups  # the last chunk may be partial; chunks past K load nothing
        byte = g_idx[:, None] * H + offs_h[None, :]  # [NG, H] byte column within a row
        b = tl.load(w_rows + byte[None, :, :], mask=n_ok[:, None, None] & g_ok[None, :, None], other=0)
        q_lo = _nibble_code(b & 15)  # 1 + q / 16 for k = 2 * byte
        q_hi = _nibble_code(b >> 4)  # k = 2 * byte + 1
        sz_mask = n_ok[:, None] & g_ok[None, :]
        s = tl.load(s_ptr + sz_rows + g_idx[None, :], mask=sz_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz_rows + g_idx[None, :], mask=sz_mask, other=0.0).to(tl.float32)
        z8 = z - 24.0 * s  # W = q_code * s + z8 with q_code = 1 + q / 16 and s scaled by 16 below
        s = 16.0 * s
        if REDUCE_AT_END:
            xe, xo = _load_x_pairs(x_ptr, g_idx, g_ok, NG, GROUP)
            s3 = s[:, :, None]
            z3 = z8[:, :, None]
            acc3 += (q_lo * s3 + z3) * xe[None, :, :]  # two statements: two FMAs per weight
            acc3 += (q_hi * s3 + z3) * xo[None, :, :]
        else:
            for m in tl.static_range(M):
                xe, xo = _load_x_pairs(x_ptr + m * stride_xm, g_idx, g_ok, NG, GROUP)
                xq = tl.sum(q_lo * xe[None, :, :] + q_hi * xo[None, :, :], axis=2)  # [BLOCK_N, NG]
                xs = tl.sum(xe + xo, axis=1)  # [NG]
                part = tl.sum(s * xq + z8 * xs[None, :], axis=1)  # [BLOCK_N]
                acc = tl.where(offs_m[:, None] == m, acc + part[None, :], acc)
    if REDUCE_AT_END:
        acc = tl.broadcast_to(tl.sum(tl.sum(acc3, axis=2), axis=1)[None, :], (BLOCK_M, BLOCK_N))
    out = out_ptr + pid_k.to(tl.int64) * stride_os + offs_m[:, None] * stride_on + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_ok[None, :])


def split_slices(kernel: str, steps: int, split: int) -> tuple[int, int]:
    """``split`` K slices of ``steps`` loop steps -> (slices, steps per slice), no empty slices."""
    if split < 1:
        raise ValueError(f"{kernel}: split_k={split} must be >= 1")
    per_split = triton.cdiv(steps, split)
    return triton.cdiv(steps, per_split), per_split


def auto_split_k(n_blocks: int, chunks: int) -> int:
    """Split K only when there are too few column blocks to fill the GPU (k/v proj: N = 1024)."""
    return max(1, min(chunks, triton.cdiv(TARGET_PROGRAMS, n_blocks)))


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              block_n: int = 16, block_k: int = 512, split_k: int | None = None, num_warps: int = 8,
              num_stages: int = 2, reduce_at_end: bool | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(W)^T -> [M, N]`` in x's dtype, for 1 <= M <= 16 (inputs checked by the op).

    Knobs: ``block_n`` output features per program; ``block_k`` weights along K per loop step
    (raised to ``group_size`` if smaller, capped at K rounded up to a power of two);
    ``split_k`` K slices (None: ``auto_split_k``); ``num_warps``, ``num_stages`` as in Triton;
    ``reduce_at_end`` (M = 1 only; None: on for M = 1) picks the element-wise accumulation.
    Defaults are unmeasured guesses from the sm_90 compile (16-byte loads, 80-170 registers for
    M = 1..16, no spills; tests/test_int4_triton.py checks that); ``bench/int4_gemv.py --sweep`` picks.
    """
    M, K = x.shape
    N = packed.shape[0]
    if not 1 <= M <= MAX_M:
        raise ValueError(f"int4_gemv: M={M} rows; the GEMV kernel takes 1..{MAX_M} (larger M: dequantize + matmul)")
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"int4_gemv: {name}={v} must be a power of two")
    if reduce_at_end is None:
        reduce_at_end = M == 1
    elif reduce_at_end and M != 1:
        raise ValueError(f"int4_gemv: reduce_at_end=True needs M == 1 (one accumulator tile per row), got M={M}")
    x, packed, scales, zeros = x.contiguous(), packed.contiguous(), scales.contiguous(), zeros.contiguous()
    block_k = min(max(block_k, group_size), max(group_size, next_pow2(K)))
    n_blocks = triton.cdiv(N, block_n)
    chunks = triton.cdiv(K, block_k)
    split, per_split = split_slices("int4_gemv", chunks, auto_split_k(n_blocks, chunks) if split_k is None
                                    else int(split_k))
    if split == 1:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    if M and N:
        int4_gemv_kernel[(n_blocks, split)](
            x, packed, scales, zeros, out, N, K, x.stride(0), packed.stride(0), scales.stride(0), N, M * N, per_split,
            M=M, BLOCK_M=next_pow2(M), GROUP=group_size, BLOCK_N=block_n, BLOCK_K=block_k,
            REDUCE_AT_END=bool(reduce_at_end), num_warps=num_warps, num_stages=num_stages,
            **launch_options(x.device),
        )
    return out if split == 1 else out.sum(0).to(x.dtype)
