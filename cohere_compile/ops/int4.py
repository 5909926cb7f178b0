"""``cohere::int4_linear``: ``x @ W^T`` with W stored as asymmetric int4 groups (our layout).

Layout (what ``cohere_compile.quant.int4_triton`` writes and the kernel reads):
  ``packed``  uint8 ``[N, K // 2]``: byte ``j`` holds ``q[:, 2j]`` in the low nibble and
              ``q[:, 2j + 1]`` in the high nibble, ``q`` in 0..15;
  ``scales``, ``zeros``  ``[N, K // group_size]`` in the model's dtype (bf16 on GPU, as tinygemm);
  ``W[n, k] = (q[n, k] - 8) * scales[n, k // group_size] + zeros[n, k // group_size]`` (fp32 math),
  which is torchao's tinygemm dequantization (zero point in the float domain).

Paths: one row (batch-1 decode) on CUDA (and on CPU under TRITON_INTERPRET=1) runs the
word-wise GEMV ``kernels/int4_gemv_m1.py`` where its layout needs hold (groups of >= 8, a
contiguous packed weight), else, and for rows M = x.numel() / K <= 16, the Triton GEMV
``kernels/int4_gemv.py``; more rows (prefill) dequantize W to x's dtype, 8192
output features at a time (``kernels/int4_dequant.py``: one pass over the packed weight), and call
``torch.mm`` inside the op (the weight is materialised once per call); CPU without the interpreter
computes the fp32 reference below.
"""

import torch

from ..kernels import int4_dequant as kernel_dequant
from ..kernels import int4_gemv as kernel
from ..kernels import int4_gemv_m1 as kernel_m1
from ._dispatch import check_inputs, use_triton

MID = 8  # tinygemm's mid point: (quant_min + quant_max + 1) / 2 for 0..15


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``q`` integer ``[N, K]`` in 0..15 (K even) -> uint8 ``[N, K // 2]``, even k in the low nibble."""
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"pack_int4: expected [N, K] with K even, got {tuple(q.shape)}")
    if q.is_floating_point() or q.numel() and (q.min() < 0 or q.max() > 15):
        raise ValueError("pack_int4: values must be integers in 0..15")
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K // 2]`` -> uint8 ``[N, K]`` in 0..15 (inverse of ``pack_int4``)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp32 weight ``[N, K]`` the layout stands for."""
    q = unpack_int4(packed).float() - MID
    n, k = q.shape
    w = q.view(n, k // group_size, group_size) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(n, k)


DEQUANT_ROWS = 8192  # output features dequantized at a time on the large-M path (bounds its temporary memory)


def dequantize_matmul(x2: torch.Tensor, packed, scales, zeros, group_size: int) -> torch.Tensor:
    """``x2 [M, K] @ W^T`` by dequantizing W in slices of output features: on CUDA each slice is
    dequantized to x's dtype for the tensor-core matmul (prefill), on CPU the math stays fp32
    (reference). The dequantization is the Triton kernel ``kernels/int4_dequant.py`` where Triton
    runs (CUDA, or the interpreter), else the torch expression ``dequantize_int4``."""
    cuda = x2.device.type == "cuda"
    w_dtype = x2.dtype if cuda else torch.float32
    out = torch.empty((x2.shape[0], packed.shape[0]), dtype=x2.dtype, device=x2.device)
    xf = x2 if cuda else x2.float()
    triton_pass = use_triton(x2)
    for n0 in range(0, packed.shape[0], DEQUANT_ROWS):
        rows = slice(n0, n0 + DEQUANT_ROWS)
        if triton_pass:
            w = kernel_dequant.dequantize(packed[rows], scales[rows], zeros[rows], group_size, w_dtype)
        else:
            w = dequantize_int4(packed[rows], scales[rows], zeros[rows], group_size).to(w_dtype)
        out[:, rows] = xf @ w.t()
    return out


def check_layout(op_name: str, x, packed, scales, zeros, group_size: int) -> None:
    check_inputs(op_name, x, scales, zeros)
    devices = {t.device for t in (x, packed, scales, zeros)}
    if len(devices) > 1:
        raise ValueError(f"{op_name}: inputs are on different devices {sorted(map(str, devices))}; move them together")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"{op_name}: packed must be uint8 [N, K // 2], got {packed.dtype} {tuple(packed.shape)}")
    if group_size < 2 or group_size & (group_size - 1):
        raise ValueError(f"{op_name}: group_size={group_size} must be a power of two >= 2")
    n, k = packed.shape[0], 2 * packed.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"{op_name}: x has {x.shape[-1]} features, the weight has in_features={k}")
    if k % group_size:
        raise ValueError(f"{op_name}: in_features={k} is not a multiple of group_size={group_size}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (n, k // group_size) or not t.is_floating_point():
            raise ValueError(f"{op_name}: {name} must be floating [N, K // group_size] = {(n, k // group_size)}, "
                             f"got {t.dtype} {tuple(t.shape)}")


@torch.library.custom_op("cohere::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    check_layout("cohere::int4_linear", x, packed, scales, zeros, group_size)
    n, k = packed.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)
    if use_triton(x) and kernel_m1.supports(x2, packed, group_size):
        out = kernel_m1.int4_gemv_m1(x2, packed, scales, zeros, group_size)
    elif use_triton(x) and 1 <= x2.shape[0] <= kernel.MAX_M:
        out = kernel.int4_gemv(x2, packed, scales, zeros, group_size)
    else:
        out = dequantize_matmul(x2, packed, scales, zeros, group_size)
    return out.view(*x.shape[:-1], n)


@int4_linear.register_fake
def _(x, packed, scales, zeros, group_size):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _setup_context(ctx, inputs, output):
    x, packed, scales, zeros, group_size = inputs
    ctx.save_for_backward(packed, scales, zeros)
    ctx.group_size, ctx.x_dtype = group_size, x.dtype


def _backward(ctx, grad_out):
    """Only ``x`` gets a gradient (the int4 weights are frozen): ``grad_x = grad_out @ W``, with W
    dequantized whole (correct, not fast: enough for a frozen int4 layer under trainable ones)."""
    packed, scales, zeros = ctx.saved_tensors
    w = dequantize_int4(packed, scales, zeros, ctx.group_size)
    grad_x = (grad_out.float() @ w).to(ctx.x_dtype)
    return grad_x, None, None, None, None


int4_linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("cohere::int4_linear_partials", mutates_args=())
def int4_linear_partials(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         group_size: int, up: torch.Tensor | None = None) -> torch.Tensor:
    """One row of ``x`` (any leading dims of size 1) -> fp32 ``[split, N]`` partial sums over the
    split-K slices of the word-wise GEMV's default launch (``kernels/int4_gemv_m1.launch_plan``);
    their sum over dim 0 is ``int4_linear``'s result before its cast. With ``up``, the input is
    ``cohere::swiglu(x, up)`` (x the gate), computed as the kernel reads it. Inference only (no
    autograd): ``passes/int4_split_k.py`` puts it in decode graphs, where the sum joins the next kernel."""
    check_layout("cohere::int4_linear_partials", x, packed, scales, zeros, group_size)
    n, k = packed.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] != 1:
        raise ValueError(f"cohere::int4_linear_partials: takes one row, got {x2.shape[0]} (use cohere::int4_linear)")
    if up is not None:
        check_inputs("cohere::int4_linear_partials", up)
        if up.shape != x.shape or up.dtype != x.dtype:
            raise ValueError(f"cohere::int4_linear_partials: up {tuple(up.shape)} {up.dtype} must match the gate x "
                             f"{tuple(x.shape)} {x.dtype}")
        up = up.reshape(1, k)
    if use_triton(x) and kernel_m1.supports(x2, packed, group_size):
        return kernel_m1.int4_gemv_m1_partials(x2, packed, scales, zeros, group_size, up)
    # the same slices in fp32 torch (CPU without the interpreter, or a weight the kernel cannot view as words)
    if up is not None:
        x2 = torch.ops.cohere.swiglu(x2, up)
    plan = kernel_m1.launch_plan(n, k, group_size)
    w = dequantize_int4(packed, scales, zeros, group_size)
    width = plan["per_split"] * plan["block_k"]
    xf = x2.float()
    return torch.cat([xf[:, k0:k0 + width] @ w[:, k0:k0 + width].t() for k0 in range(0, k, width)])


@int4_linear_partials.register_fake
def _(x, packed, scales, zeros, group_size, up=None):
    split = kernel_m1.launch_plan(packed.shape[0], x.shape[-1], group_size)["split"]
    return x.new_empty((split, packed.shape[0]), dtype=torch.float32)
