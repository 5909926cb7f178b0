"""int4 weight-only GEMV for one row of x (batch-1 decode): ``out[n] = sum_k x[k] * W[n, k]``.

Same weight layout as ``int4_gemv.py`` (``ops/int4.py``): ``packed`` uint8 ``[N, K // 2]``
(byte ``j``: ``q[2j]`` low nibble, ``q[2j + 1]`` high nibble), ``scales`` / ``zeros``
``[N, K // G]``, ``W = (q - 8) * scale + zero``. This kernel reads ``packed`` as int32 words
(``packed.view(torch.int32)``, 8 nibbles each; little-endian, so nibble ``i`` of word ``j`` is
``q[8j + i]``) and is written to spend as few instructions per weight as it can, because the
first kernel's ~8 instructions per weight (SASS of its K loop) capped it near 1.6 TB/s on the
H200, below tinygemm. Here a weight costs three: a shift and one LOP3 turn nibble ``i`` into the
fp32 ``c = 1 + q / 16`` (the nibble moved to the top of 1.0's mantissa; the OR constant comes in
as the runtime argument ``magic`` so that ptxas can fold mask and OR into one LOP3), and one
FFMA accumulates ``x * c``. Scales and zeros are applied once per group and row:
``sum_{k in g} x W = 16 s_g * sum x c + (z_g - 24 s_g) * sum x``.

Tile: ``[BLOCK_N, BLOCK_K // G, G // 8]`` words per loop step; the x values of a step are loaded
once per program and reused by all the rows a thread holds, so large ``BLOCK_N`` amortizes them.
``PREFETCH`` loads the next step's words (and scales, zeros, x) before computing the current one,
to keep more bytes in flight per thread. ``STAGES > 1`` hands that to Triton's software pipeline
instead (the words through shared memory, ``STAGES - 1`` steps ahead; a launch knob, off by
default: on the H200 it was no faster at any tile, since the kernel is issue-bound, not
latency-bound; bench/results/int4_gemv_m1_stages.json). Under PDL (``kernels/pdl.py``) the first step's words,
scales and zeros are read before the wait for the previous kernel (they are constants); x after.
``SPLIT_K > 1`` writes fp32 partials ``[SPLIT_K, N]`` summed by the launcher (deterministic, no
atomics), or by the caller (``int4_gemv_m1_partials``).
"""

import torch
import triton
import triton.language as tl

from .int4_gemv import split_slices
from .pdl import launch_options, wait_then_release
from .swiglu import silu_times

MAGIC_ONE = 0x3F800000  # fp32 1.0
SM_COUNT_GUESS = 132  # H200; only used to decide when to split K (few column blocks)
# Split K only below this many column blocks. H200 sweep (int4_gemv_m1_aya-8b_cuda.json): down
# proj, 32 blocks: 17.8 us split 9 ways vs 62.5 unsplit; gate/up, 112 blocks: 19.2 unsplit vs 23.7
# split 3 ways, and k/v, 64 blocks: 6.3 vs 6.6 (the split's partial sums cost two more kernels).
SPLIT_BELOW_BLOCKS = 64


@triton.jit
def _code(w, w_hi, magic, i: tl.constexpr):
    """Nibble ``i`` of int32 words -> fp32 ``1 + q / 16``. ``w_hi = w >> 16`` holds nibbles 4..7
    in its low half, so every nibble is one left shift (IMAD.SHL or SHF) and one LOP3 away."""
    if i < 4:
        v = w << (19 - 4 * i)
    else:
        v = w_hi << (19 - 4 * (i - 4))
    return ((v & 0x00780000) | magic).to(tl.float32, bitcast=True)


@triton.jit
def _load_weights(w_rows, s_ptr, z_ptr, sz_rows, c, n_ok, k_groups, NG: tl.constexpr, WPG: tl.constexpr,
                  EVEN: tl.constexpr):
    """Words ``[BLOCK_N, NG, WPG]``, scales and zeros ``[BLOCK_N, NG]`` (fp32) of loop step ``c``."""
    g_idx = c * NG + tl.arange(0, NG)
    word = g_idx[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [NG, WPG] word index along the row
    sp = sz_rows + g_idx[None, :]
    if EVEN:
        w = tl.load(w_rows + word[None, :, :])
        s = tl.load(s_ptr + sp).to(tl.float32)
        z = tl.load(z_ptr + sp).to(tl.float32)
    else:
        g_ok = g_idx < k_groups  # a partial last step, or steps past K in the last split
        w = tl.load(w_rows + word[None, :, :], mask=n_ok[:, None, None] & g_ok[None, :, None], other=0)
        sz_ok = n_ok[:, None] & g_ok[None, :]
        s = tl.load(s_ptr + sp, mask=sz_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sp, mask=sz_ok, other=0.0).to(tl.float32)
    return w, s, z


@triton.jit
def _load_x(x_ptr, u_ptr, c, k_groups, NG: tl.constexpr, WPG: tl.constexpr, EVEN: tl.constexpr,
            SWIGLU: tl.constexpr):
    """x ``[NG, WPG, 8]`` (fp32) of loop step ``c``. ``SWIGLU``: x is ``silu(gate) * up`` of the
    gate at ``x_ptr`` and the up at ``u_ptr``, rounded as ``swiglu.swiglu_kernel`` rounds (the
    silu, then the product, to the input dtype): the down projection reads the MLP's activation
    without a kernel of its own to write it."""
    g_idx = c * NG + tl.arange(0, NG)
    word = g_idx[:, None] * WPG + tl.arange(0, WPG)[None, :]
    offs = word[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    g_ok = (g_idx < k_groups)[:, None, None]
    if EVEN:
        x = tl.load(x_ptr + offs)
    else:
        x = tl.load(x_ptr + offs, mask=g_ok, other=0.0)
    if SWIGLU:
        if EVEN:
            u = tl.load(u_ptr + offs).to(tl.float32)
        else:
            u = tl.load(u_ptr + offs, mask=g_ok, other=0.0).to(tl.float32)
        x = silu_times(x.to(tl.float32), u, x_ptr.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _lean_code(w, magic, i: tl.constexpr):
    """Nibble ``i`` of int32 words -> fp32 ``1 + q / 16`` with one shift of ``w`` itself (left for
    nibbles 0..4, right for 5..7: the mask drops whatever the arithmetic shift brings in)."""
    if i <= 4:
        v = w << (19 - 4 * i)
    else:
        v = w >> (4 * i - 19)
    return ((v & 0x00780000) | magic).to(tl.float32, bitcast=True)


@triton.jit
def _nibble_slices(x):
    """x ``[..., 2, 2, 2]`` (the bits of nibble index i = 4 * i2 + 2 * i1 + i0, i0 last) -> the
    8 slices ``x_i [...]``; the splits peel the last dim's bits (i0, then i1, then i2)."""
    xa, xb = tl.split(x)  # i & 1
    xa0, xa1 = tl.split(xa)  # bit 1 of i (even i)
    xb0, xb1 = tl.split(xb)
    x0, x4 = tl.split(xa0)
    x2, x6 = tl.split(xa1)
    x1, x5 = tl.split(xb0)
    x3, x7 = tl.split(xb1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _word_sum(acc, w, x, magic):
    """``acc + sum_i x_i * code_i`` over the 8 nibbles of each word, as a chain of 8 FFMA."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _nibble_slices(x)
    return acc + _lean_code(w, magic, 0) * x0[None] + _lean_code(w, magic, 1) * x1[None] \
        + _lean_code(w, magic, 2) * x2[None] + _lean_code(w, magic, 3) * x3[None] \
        + _lean_code(w, magic, 4) * x4[None] + _lean_code(w, magic, 5) * x5[None] \
        + _lean_code(w, magic, 6) * x6[None] + _lean_code(w, magic, 7) * x7[None]


@triton.jit
def _step_lean(w, x, s, z, magic, BLOCK_N: tl.constexpr, NG: tl.constexpr, WPG: tl.constexpr, DEFER: tl.constexpr):
    """``_step`` in fewer instructions per weight (a launch knob, ``lean``, not yet measured on a GPU):
    no ``w >> 16`` (each nibble is one shift of the word itself), and each pair of neighbouring
    words summed as one FFMA chain, so half the FMULs that start a word's sum and the FADDs that
    add words go. sm_90 SASS of the K loop with the LARGE knobs: 3.71 per weight (3.90 without),
    the same 168 registers. (Chains of four words: 3.65, but 255 registers.) ``DEFER`` (``lean=2``)
    also leaves the sum over each group's pairs, a cross-lane reduction every step, to the end:
    the scale multiplies each pair's partial sum instead. 3.59 per weight at LARGE but 255
    registers; 4.70 at SMALL (5.03 without, 64 registers). Returns (pairs to accumulate
    ``[BLOCK_N, NG, WPG // 2]``, or the unused ``p`` without ``DEFER``; the rest ``[BLOCK_N, NG]``)."""
    # word j = 2 * a + b of the group: w [BLOCK_N, NG, a, b]; x [NG, a, b, i2, i1, i0] moved to
    # [NG, a, i2, i1, i0, b]; splitting b gives the even and odd words' [.., a] slices
    w0, w1 = tl.split(tl.reshape(w, (BLOCK_N, NG, WPG // 2, 2)))
    x0, x1 = tl.split(tl.permute(tl.reshape(x, (NG, WPG // 2, 2, 2, 2, 2)), (0, 1, 3, 4, 5, 2)))
    p = _word_sum(tl.zeros(w0.shape, tl.float32), w0, x0, magic)
    p = _word_sum(p, w1, x1, magic)
    xs = tl.sum(tl.sum(x, axis=2), axis=1)
    if DEFER:  # the scale goes onto each pair's partial sum, whose sum across lanes waits for the end
        return (16.0 * s)[:, :, None] * p, (z - 24.0 * s) * xs[None, :]
    else:
        return p, (16.0 * s) * tl.sum(p, axis=2) + (z - 24.0 * s) * xs[None, :]


@triton.jit
def _accumulate(acc, acc_pairs, w, x, s, z, magic, BLOCK_N: tl.constexpr, NG: tl.constexpr, WPG: tl.constexpr,
                LEAN: tl.constexpr):
    """One step into ``acc [BLOCK_N, NG]`` (and, ``LEAN == 2``, ``acc_pairs [BLOCK_N, NG, WPG // 2]``)."""
    if LEAN > 0 and WPG % 2 == 0:  # the lean step sums words in pairs (a group of >= 16)
        pairs, rest = _step_lean(w, x, s, z, magic, BLOCK_N, NG, WPG, LEAN == 2)
        if LEAN == 2:
            return acc + rest, acc_pairs + pairs
        else:
            return acc + rest, acc_pairs
    else:
        return acc + _step(w, x, s, z, magic, NG, WPG), acc_pairs


@triton.jit
def _step(w, x, s, z, magic, NG: tl.constexpr, WPG: tl.constexpr):
    """This step's contribution ``[BLOCK_N, NG]`` (per row and group)."""
    w_hi = w >> 16
    # x [NG, WPG, 8] -> x_i [NG, WPG] for nibble i (k = 8 * word + i)
    x0, x1, x2, x3, x4, x5, x6, x7 = _nibble_slices(tl.reshape(x, (NG, WPG, 2, 2, 2)))
    p = _code(w, w_hi, magic, 0) * x0[None] + _code(w, w_hi, magic, 1) * x1[None] \
        + _code(w, w_hi, magic, 2) * x2[None] + _code(w, w_hi, magic, 3) * x3[None] \
        + _code(w, w_hi, magic, 4) * x4[None] + _code(w, w_hi, magic, 5) * x5[None] \
        + _code(w, w_hi, magic, 6) * x6[None] + _code(w, w_hi, magic, 7) * x7[None]
    xc = tl.sum(p, axis=2)  # [BLOCK_N, NG]: sum over the group of x * c
    xs = tl.sum(tl.sum(x, axis=2), axis=1)  # [NG]: sum over the group of x
    return (16.0 * s) * xc + (z - 24.0 * s) * xs[None, :]


@triton.jit
def int4_gemv_m1_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_os, STEPS_PER_SPLIT,
                        magic, u_ptr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr, SWIGLU: tl.constexpr,
                        STAGES: tl.constexpr, LEAN: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    NG: tl.constexpr = BLOCK_K // GROUP  # groups per step
    WPG: tl.constexpr = GROUP // 8  # int32 words per group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_groups = K // GROUP
    # row strides as arguments (in words / elements): Triton then knows their alignment (16-byte loads)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None, None] * stride_wn
    sz_rows = offs_n.to(tl.int64)[:, None] * stride_sn
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    PAIRS: tl.constexpr = WPG // 2 if LEAN == 2 and WPG % 2 == 0 else 1
    acc_pairs = tl.zeros((BLOCK_N, NG, PAIRS), dtype=tl.float32)  # lean=2's, else unused
    c0 = pid_k * STEPS_PER_SPLIT
    c_last = c0 + STEPS_PER_SPLIT - 1
    # Weights, scales and zeros are the model's constants, so the first step's are read before the
    # PDL wait: their DRAM latency overlaps the previous kernel's tail. x (that kernel's output) and
    # the store come after it.
    w, s, z = _load_weights(w_rows, s_ptr, z_ptr, sz_rows, c0, n_ok, k_groups, NG, WPG, EVEN)
    wait_then_release(PDL)
    x = _load_x(x_ptr, u_ptr, c0, k_groups, NG, WPG, EVEN, SWIGLU)
    if STAGES > 1:
        # Triton's software pipeline: the loop's loads go to shared memory (cp.async) STAGES - 1
        # steps ahead, more bytes in flight per SM than registers can hold (and fewer registers)
        acc, acc_pairs = _accumulate(acc, acc_pairs, w, x, s, z, magic, BLOCK_N, NG, WPG, LEAN)
        for c in tl.range(c0 + 1, c0 + STEPS_PER_SPLIT, num_stages=STAGES):
            w, s, z = _load_weights(w_rows, s_ptr, z_ptr, sz_rows, c, n_ok, k_groups, NG, WPG, EVEN)
            x = _load_x(x_ptr, u_ptr, c, k_groups, NG, WPG, EVEN, SWIGLU)
            acc, acc_pairs = _accumulate(acc, acc_pairs, w, x, s, z, magic, BLOCK_N, NG, WPG, LEAN)
    else:
        for c in range(c0, c0 + STEPS_PER_SPLIT):
            # the next step (the last one again at the end: a redundant read of what is in cache)
            c_next = tl.minimum(c + 1, c_last)
            if PREFETCH:  # issue the next step's loads before this step's arithmetic
                w_n, s_n, z_n = _load_weights(w_rows, s_ptr, z_ptr, sz_rows, c_next, n_ok, k_groups, NG, WPG, EVEN)
                x_n = _load_x(x_ptr, u_ptr, c_next, k_groups, NG, WPG, EVEN, SWIGLU)
                acc, acc_pairs = _accumulate(acc, acc_pairs, w, x, s, z, magic, BLOCK_N, NG, WPG, LEAN)
                w, s, z, x = w_n, s_n, z_n, x_n
            else:
                acc, acc_pairs = _accumulate(acc, acc_pairs, w, x, s, z, magic, BLOCK_N, NG, WPG, LEAN)
                w, s, z = _load_weights(w_rows, s_ptr, z_ptr, sz_rows, c_next, n_ok, k_groups, NG, WPG, EVEN)
                x = _load_x(x_ptr, u_ptr, c_next, k_groups, NG, WPG, EVEN, SWIGLU)
    out = tl.sum(acc, axis=1)
    if LEAN == 2 and WPG % 2 == 0:
        out += tl.sum(tl.sum(acc_pairs, axis=2), axis=1)
    tl.store(out_ptr + pid_k.to(tl.int64) * stride_os + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def supports_layout(x: torch.Tensor, packed: torch.Tensor, group_size: int) -> bool:
    """``supports`` without the alignment check, which needs real storage: what a graph pass can
    tell from fake tensors."""
    k = x.shape[-1]
    return x.numel() == k and group_size >= 8 and k % 8 == 0 and packed.is_contiguous()


def supports(x: torch.Tensor, packed: torch.Tensor, group_size: int) -> bool:
    """One row, groups of >= 8 (a group is whole int32 words) and a packed tensor that can be
    viewed as int32 rows (contiguous, 4-byte aligned)."""
    return supports_layout(x, packed, group_size) and packed.data_ptr() % 4 == 0


def auto_split_k(n_blocks: int, steps: int) -> int:
    """Split K only when the column blocks leave most SMs idle (down proj: N = 4096 in 128-row blocks)."""
    if n_blocks >= SPLIT_BELOW_BLOCKS:
        return 1
    return max(1, min(steps, triton.cdiv(2 * SM_COUNT_GUESS, n_blocks)))


# Launch knobs by weight shape, from the H200 sweep (bench/int4_gemv.py --sweep, JSON
# int4_gemv_m1_aya-8b_cuda.json; us per call in a CUDA graph at Aya-8B shapes). Large weights want
# many rows per program (x reused across them: 3.9 SASS instructions per weight) and prefetch;
# small ones are latency-bound and want many programs (16 rows each).
# LM head 193.6, down 17.8, gate/up 19.2
LARGE = dict(block_n=128, block_k=256, num_warps=4, prefetch=True, stages=1, lean=0)
SMALL = dict(block_n=16, block_k=512, num_warps=4, prefetch=False, stages=1, lean=0)  # q/o 8.1, k/v 6.3
LARGE_FROM = 8192  # N or K at least this: LARGE


def default_knobs(n: int, k: int) -> dict:
    return dict(LARGE if max(n, k) >= LARGE_FROM else SMALL)


def launch_plan(n: int, k: int, group_size: int, block_n: int | None = None, block_k: int | None = None,
                split_k: int | None = None, num_warps: int | None = None, prefetch: bool | None = None,
                stages: int | None = None, lean: int | None = None) -> dict:
    """The launch for an ``[N, K]`` weight: the knobs (any left None from ``default_knobs``;
    ``block_k`` raised to ``group_size``), the grid and ``split`` K slices of ``per_split`` steps.
    A function of the shapes alone, so a graph pass can know ``split`` before anything runs."""
    default = default_knobs(n, k)
    block_n = default["block_n"] if block_n is None else block_n
    block_k = default["block_k"] if block_k is None else block_k
    num_warps = default["num_warps"] if num_warps is None else num_warps
    prefetch = default["prefetch"] if prefetch is None else prefetch
    stages = default["stages"] if stages is None else int(stages)
    lean = default["lean"] if lean is None else int(lean)
    if lean not in (0, 1, 2):
        raise ValueError(f"int4_gemv_m1: lean={lean} must be 0 (off), 1 (pair chains) or 2 (and the sum deferred)")
    if stages < 1:
        raise ValueError(f"int4_gemv_m1: stages={stages} must be >= 1 (1: prefetch in registers)")
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"int4_gemv_m1: {name}={v} must be a power of two")
    block_k = max(block_k, group_size)
    n_blocks = triton.cdiv(n, block_n)
    steps = triton.cdiv(k, block_k)
    split, per_split = split_slices("int4_gemv_m1", steps, auto_split_k(n_blocks, steps) if split_k is None
                                    else int(split_k))
    return dict(block_n=block_n, block_k=block_k, num_warps=num_warps, prefetch=bool(prefetch), stages=stages,
                lean=lean, n_blocks=n_blocks, steps=steps, split=split, per_split=per_split)


def _launch(x, packed, scales, zeros, group_size, plan: dict, out: torch.Tensor, up: torch.Tensor | None = None) -> None:
    """One launch of ``plan`` into ``out``; with ``up`` the input is ``swiglu(x, up)``."""
    if not supports(x, packed, group_size):
        raise ValueError(f"int4_gemv_m1: needs one row, group_size >= 8 and a contiguous 4-byte aligned packed "
                         f"weight; got x {tuple(x.shape)}, group_size={group_size}, packed contiguous="
                         f"{packed.is_contiguous()}")
    n, k = packed.shape[0], x.shape[-1]
    if not n:
        return
    x, scales, zeros = x.contiguous(), scales.contiguous(), zeros.contiguous()
    if up is not None and (up.shape != x.shape or up.dtype != x.dtype):
        raise ValueError(f"int4_gemv_m1: swiglu's up {tuple(up.shape)} {up.dtype} must match the gate "
                         f"{tuple(x.shape)} {x.dtype}")
    u = x if up is None else up.contiguous()
    words = packed.view(torch.int32)  # [N, K // 8]
    block_n, block_k, per_split = plan["block_n"], plan["block_k"], plan["per_split"]
    even = n % block_n == 0 and k % block_k == 0 and plan["steps"] % per_split == 0
    int4_gemv_m1_kernel[(plan["n_blocks"], plan["split"])](
        x, words, scales, zeros, out, n, k, words.stride(0), scales.stride(0), n, per_split, MAGIC_ONE, u,
        GROUP=group_size, BLOCK_N=block_n, BLOCK_K=block_k, EVEN=even, PREFETCH=plan["prefetch"],
        SWIGLU=up is not None, STAGES=plan["stages"], LEAN=plan["lean"], num_warps=plan["num_warps"],
        num_stages=plan["stages"], **launch_options(x.device),
    )


def int4_gemv_m1(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
                 num_warps: int | None = None, prefetch: bool | None = None, stages: int | None = None,
                 lean: int | None = None) -> torch.Tensor:
    """``x [1, K] @ dequant(W)^T -> [1, N]`` in x's dtype (inputs checked by the op; ``supports``
    must hold). Knobs: ``block_n`` rows per program, ``block_k`` weights along K per loop step
    (raised to ``group_size``), ``split_k`` (None: ``auto_split_k``), ``num_warps``, ``prefetch``,
    ``stages`` (> 1: Triton's pipeline through shared memory instead of ``prefetch``), ``lean``
    (``_step_lean``: 1, or 2 with the per-step sum deferred; fewer instructions per weight);
    any left None comes from ``default_knobs``. Split K sums its fp32 partials here (two more
    kernels); ``int4_gemv_m1_partials`` leaves that sum to the caller."""
    n = packed.shape[0]
    plan = launch_plan(n, x.shape[-1], group_size, block_n, block_k, split_k, num_warps, prefetch, stages, lean)
    split = plan["split"]
    out = torch.empty((split, n) if split > 1 else (1, n), dtype=torch.float32 if split > 1 else x.dtype,
                      device=x.device)
    _launch(x, packed, scales, zeros, group_size, plan, out)
    return out if split == 1 else out.sum(0, keepdim=True).to(x.dtype)


def int4_gemv_m1_partials(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          group_size: int, up: torch.Tensor | None = None) -> torch.Tensor:
    """The default launch's fp32 partial sums ``[split, N]`` (``launch_plan(...)["split"]`` K
    slices, summed they are ``x @ W^T``, or ``swiglu(x, up) @ W^T`` with ``up``): a compiled graph
    sums them in the kernel that consumes the output (passes/int4_split_k.py) instead of in two
    kernels of their own."""
    n = packed.shape[0]
    plan = launch_plan(n, x.shape[-1], group_size)
    out = torch.empty((plan["split"], n), dtype=torch.float32, device=x.device)
    _launch(x, packed, scales, zeros, group_size, plan, out, up)
    return out
