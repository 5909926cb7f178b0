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
from .pdl import launch_options, wait_then_release


@triton.jit
def layer_norm_kernel(
    x_ptr, a_ptr, m_ptr, w_ptr, sum_ptr, out_ptr,
    n_cols, eps,
    HAS_ADDS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    wait_then_release(PDL)
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
            HAS_ADDS=False, BLOCK=block, num_warps=_num_warps(block), **launch_options(x.device),
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
            HAS_ADDS=True, BLOCK=block, num_warps=_num_warps(block), **launch_options(residual.device),
        )
    return h, out


@triton.jit
def layer_norm_backward_kernel(
    x_ptr, dy_ptr, dh_ptr, w_ptr, dx_ptr, dw_part_ptr,
    n_rows, n_cols, rows_per_program, eps,
    HAS_DH: tl.constexpr, BLOCK: tl.constexpr,
):
    """Each program owns a contiguous block of rows: it writes their dx and one fp32
    row of partial weight gradient (summed over its rows), reduced on the host.
    Mean and rstd are recomputed from x (one row already in registers), not saved:
    the forward op keeps its inference signature and saves no extra tensors."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r in range(row_start, row_end):
        offs = r * n_cols + cols  # int64: the bounds are
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        centred = tl.where(valid, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
        xhat = centred * rstd
        dxhat = dy * w
        c1 = tl.sum(xhat * dxhat, axis=0) / n_cols
        c2 = tl.sum(dxhat, axis=0) / n_cols
        dx = (dxhat - xhat * c1 - c2) * rstd
        if HAS_DH:  # add3: the residual sum h is also an output; its grad joins here
            dx += tl.load(dh_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=valid)
        dw += dy * xhat
    tl.store(dw_part_ptr + pid * n_cols + cols, dw, mask=valid)


def _programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(rows, 4 * sms))
    return max(1, min(rows, 4))  # the interpreter: few programs, fast tests


def layer_norm_backward(dy, x, weight, eps, dh=None):
    """Backward of ``layer_norm(x, weight)`` over the last dim (plus ``dh`` added to dx
    when given). Returns ``(dx, dweight)``; dx like ``x``, dweight like ``weight``."""
    n = x.shape[-1]
    x, dy, weight = x.contiguous(), dy.contiguous(), weight.contiguous()
    dh = dh.contiguous() if dh is not None else None
    dx = torch.empty_like(x)
    rows = x.numel() // n if n else 0
    if rows == 0:
        return dx, torch.zeros_like(weight)
    programs = _programs(rows, x.device)
    per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, per_program)
    dw_part = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    block = next_pow2(n)
    layer_norm_backward_kernel[(programs,)](
        x, dy, dh if dh is not None else dy, weight, dx, dw_part,
        rows, n, per_program, float(eps),
        HAS_DH=dh is not None, BLOCK=block, num_warps=_num_warps(block),
    )
    return dx, dw_part.sum(0).to(weight.dtype)


__all__ = ["layer_norm", "add3_layer_norm", "layer_norm_backward"]
