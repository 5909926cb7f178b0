"""Dequantize an int4 weight (``ops/int4.py``'s layout) to a dense ``[N, K]`` tensor in one pass.

``W[n, k] = (q[n, k] - 8) * scales[n, k // G] + zeros[n, k // G]`` in fp32, stored in the output's
dtype: the prefill path (more rows than the GEMVs take) dequantizes a slice of output features
this way and hands it to the tensor-core matmul. It replaces a chain of eager torch ops (unpack,
stack, float, multiply, add, cast: fp32 temporaries 4x the weight's bf16 size) that made a 512-token
int4 prefill of Aya-8B take ~180 ms on the H200 (bench/results/decode_profile_aya-8b_L32_int4_triton.json);
this kernel reads each packed byte once and writes each weight once.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def int4_dequant_kernel(p_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_pn, stride_sn, stride_wn,
                        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    NG: tl.constexpr = BLOCK_K // GROUP  # groups per program
    H: tl.constexpr = GROUP // 2  # bytes per group
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    groups = pid_k * NG + tl.arange(0, NG)
    r_ok = rows < N
    g_ok = groups < K // GROUP
    byte = groups[:, None] * H + tl.arange(0, H)[None, :]  # [NG, H]
    rows64 = rows.to(tl.int64)
    b = tl.load(p_ptr + rows64[:, None, None] * stride_pn + byte[None, :, :],
                mask=r_ok[:, None, None] & g_ok[None, :, None], other=0).to(tl.int32)
    sz = rows64[:, None] * stride_sn + groups[None, :]
    sz_ok = r_ok[:, None] & g_ok[None, :]
    s = tl.load(s_ptr + sz, mask=sz_ok, other=0.0).to(tl.float32)[:, :, None]
    z = tl.load(z_ptr + sz, mask=sz_ok, other=0.0).to(tl.float32)[:, :, None]
    w_lo = ((b & 15).to(tl.float32) - 8.0) * s + z  # k = 2 * byte
    w_hi = ((b >> 4).to(tl.float32) - 8.0) * s + z  # k = 2 * byte + 1
    w = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, BLOCK_K))  # [BN, NG, H, 2]: k = g * GROUP + 2h + t
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + rows64[:, None] * stride_wn + k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=r_ok[:, None] & (k < K)[None, :])


BLOCK_N = 32  # 32 x 256 weights per program (unmeasured guesses: a memory-bound element-wise pass)
BLOCK_K = 256


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``packed [N, K // 2]``, ``scales`` / ``zeros`` ``[N, K // G]`` -> ``W [N, K]`` in ``dtype``
    (layout checked by the op)."""
    packed, scales, zeros = (t if t.stride(-1) == 1 else t.contiguous() for t in (packed, scales, zeros))
    n, k = packed.shape[0], 2 * packed.shape[1]
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    if n and k:
        block_k = max(BLOCK_K, group_size)
        int4_dequant_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(k, block_k))](
            packed, scales, zeros, out, n, k, packed.stride(0), scales.stride(0), out.stride(0),
            GROUP=group_size, BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=4,
        )
    return out
