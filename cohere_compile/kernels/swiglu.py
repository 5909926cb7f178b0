"""SwiGLU's pointwise part: ``silu(gate) * up``, fp32 math, rounded like eager
(``silu`` result rounded to the input dtype before the product)."""

import torch
import triton
import triton.language as tl

from .pdl import launch_options, wait_then_release


@triton.jit
def silu_times(g, u, dtype: tl.constexpr):
    """``silu(g) * u`` from fp32 ``g`` and ``u``, rounded to ``dtype`` as eager rounds it: the
    silu, then the product (also the int4 down-projection GEMV's fused input)."""
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    return (act * u).to(dtype)


@triton.jit
def swiglu_kernel(g_ptr, u_ptr, o_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_then_release(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(o_ptr + offs, silu_times(g, u, o_ptr.dtype.element_ty), mask=valid)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = 1024
        swiglu_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=4,
                                                **launch_options(gate.device))
    return out


@triton.jit
def swiglu_backward_kernel(do_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    """Recomputes sigmoid(gate) from the saved gate instead of saving silu(gate)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    do = tl.load(do_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    act = (g * sig).to(du_ptr.dtype.element_ty).to(tl.float32)  # the forward's rounded silu
    d_act = (do * u).to(dg_ptr.dtype.element_ty).to(tl.float32)  # eager rounds this grad too
    tl.store(du_ptr + offs, (do * act).to(du_ptr.dtype.element_ty), mask=valid)
    tl.store(dg_ptr + offs, (d_act * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=valid)


def swiglu_backward(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Returns ``(d_gate, d_up)`` for ``silu(gate) * up``."""
    grad_out, gate, up = grad_out.contiguous(), gate.contiguous(), up.contiguous()
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        block = 1024
        swiglu_backward_kernel[(triton.cdiv(n, block),)](
            grad_out, gate, up, d_gate, d_up, n, BLOCK=block, num_warps=4
        )
    return d_gate, d_up
