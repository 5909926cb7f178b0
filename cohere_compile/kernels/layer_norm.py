"""Cohere LayerNorm kernels: fp32 math, mean-centred, weight only (no bias).

``layer_norm_kernel`` normalises one row per program. With ``HAS_ADDS`` it first
forms the parallel-block residual sum ``(residual + attn) + mlp`` (rounded to the
input dtype after each add, as eager PyTorch does), writes it out, and normalises
it: the decoder layer's closing adds fused with the next layer's norm.
"""

import torch
import triton
import triton.language as tl

from . import next_pow2


@triton.jit
def layer_norm_kernel(
    x_ptr, a_ptr, m_ptr, w_ptr, sum_ptr, out_ptr,
    n_cols, eps,
    HAS_ADDS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    offs = row * n_cols + cols
    x = tl.load(x_ptr + offs, mask=valid, other=0.0)
    if HAS_ADDS:
        a = tl.load(a_ptr + offs, mask=valid, other=0.0)
        m = tl.load(m_ptr + offs, mask=valid, other=0.0)
        x = (x.to(tl.float32) + a.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        x = (x.to(tl.float32) + m.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offs, x, mask=valid)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=0) / n_cols
    centred = tl.where(valid, xf - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (w * (centred * rstd)).to(out_ptr.dtype.element_ty), mask=valid)


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 512))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise the last dim of contiguous ``x``; returns a tensor like ``x``."""
    n = x.shape[-1]
    out = torch.empty_like(x)
    rows = x.numel() // n
    if rows:
        block = next_pow2(n)
        layer_norm_kernel[(rows,)](
            x, x, x, weight, out, out, n, float(eps),
            HAS_ADDS=False, BLOCK=block, num_warps=_num_warps(block),
        )
    return out


def add3_layer_norm(residual, attn, mlp, weight, eps):
    """``h = (residual + attn) + mlp``; returns ``(h, layer_norm(h))``."""
    n = residual.shape[-1]
    h = torch.empty_like(residual)
    out = torch.empty_like(residual)
    rows = residual.numel() // n
    if rows:
        block = next_pow2(n)
        layer_norm_kernel[(rows,)](
            residual, attn, mlp, weight, h, out, n, float(eps),
            HAS_ADDS=True, BLOCK=block, num_warps=_num_warps(block),
        )
    return h, out


__all__ = ["layer_norm", "add3_layer_norm"]
