"""``cohere::linear_cross_entropy``: LM head + ``logit_scale`` + cross-entropy, chunked.

The op returns ``(loss, grad_hidden, grad_weight)``: the gradients of the (scalar) loss are
computed in the forward pass, chunk by chunk, so the ``[tokens, vocab]`` logits never exist;
``register_autograd``'s backward scales them by ``grad_output``. Which gradients to compute is
an argument (``compute_grad_hidden`` / ``compute_grad_weight``): a frozen LM head (LoRA) skips
the ``[vocab, hidden]`` weight gradient, inference computes none. Gradients not computed come
back as empty tensors.

Use ``linear_cross_entropy(hidden, weight, labels, ...)`` from Python: it picks those flags
from ``requires_grad`` and returns the loss only.
"""

from __future__ import annotations

import torch

from ..kernels import cross_entropy as kernel
from ._dispatch import check_inputs, use_triton

REDUCTIONS = ("mean", "sum")
# Bytes of logits one chunk may hold (tokens_per_chunk * vocab * element size). On the GPU
# 512 MB keeps the per-chunk matmuls large (e.g. 1024 tokens x 256k vocab in bf16);
# tests lower these to force many chunks.
CHUNK_BYTES = {"cuda": 512 * 2**20, "cpu": 64 * 2**20}


def _check(hidden, weight, labels, ignore_index, reduction):
    name = "cohere::linear_cross_entropy"
    check_inputs(name, hidden, weight)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction {reduction!r} is not supported; use one of {REDUCTIONS}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not fit; weight must be "
            f"[vocab, hidden] (an nn.Linear weight) with hidden == hidden.shape[-1]"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{name}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one to the other")
    if labels.dtype != torch.int64 or labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{name}: labels must be int64 with shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}; got "
            f"{labels.dtype} {tuple(labels.shape)}"
        )


def _check_label_range(labels, vocab, ignore_index):
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        value = labels[bad][0].item()
        raise ValueError(
            f"cohere::linear_cross_entropy: label {value} is outside the vocabulary [0, {vocab}) and is not "
            f"ignore_index ({ignore_index}); fix the labels or mark such positions with {ignore_index}"
        )


def _linear_cross_entropy(hidden, weight, labels, scale, ignore_index, reduction, compute_grad_hidden,
                          compute_grad_weight):
    if isinstance(scale, torch.Tensor):
        scale = float(scale.item())
    _check(hidden, weight, labels, ignore_index, reduction)
    _check_label_range(labels, weight.shape[0], ignore_index)
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    y = labels.reshape(-1).contiguous()
    w = weight.contiguous()
    budget = CHUNK_BYTES.get(hidden.device.type, CHUNK_BYTES["cpu"])
    rows = kernel.chunk_rows(h2.shape[0], w.shape[0], w.element_size(), budget)
    rows_fn = kernel.rows_triton if use_triton(hidden) else kernel.rows_torch
    loss, g_h, g_w = kernel.fused_linear_cross_entropy(
        h2, w, y, scale, ignore_index, reduction, compute_grad_hidden, compute_grad_weight, rows, rows_fn
    )
    empty = hidden.new_empty(0)
    g_h = g_h.view(hidden.shape) if g_h is not None else empty
    g_w = g_w if g_w is not None else weight.new_empty(0)
    return loss, g_h, g_w


@torch.library.custom_op("cohere::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    ignore_index: int,
    reduction: str,
    compute_grad_hidden: bool,
    compute_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _linear_cross_entropy(hidden, weight, labels, scale, ignore_index, reduction, compute_grad_hidden,
                                 compute_grad_weight)


@torch.library.custom_op("cohere::linear_cross_entropy_tensor_scale", mutates_args=())
def linear_cross_entropy_tensor_scale_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    reduction: str,
    compute_grad_hidden: bool,
    compute_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The twin for graphs where ``logit_scale`` is a 0-d tensor input (``dynamic=True`` lifts
    the module's float attribute into one)."""
    return _linear_cross_entropy(hidden, weight, labels, scale, ignore_index, reduction, compute_grad_hidden,
                                 compute_grad_weight)


def _fake(hidden, weight, labels, scale, ignore_index, reduction, compute_grad_hidden, compute_grad_weight):
    loss = hidden.new_empty((), dtype=torch.float32)
    g_h = hidden.new_empty(hidden.shape if compute_grad_hidden else (0,))
    g_w = weight.new_empty(weight.shape if compute_grad_weight else (0,))
    return loss, g_h, g_w


def _setup_context(ctx, inputs, output):
    _, _, _, _, _, _, grad_h_computed, grad_w_computed = inputs
    ctx.computed = (grad_h_computed, grad_w_computed)
    ctx.save_for_backward(output[1], output[2])
    # the gradient outputs are values, not functions of the inputs: no gradient flows into
    # them, and autograd must not build [vocab, hidden] zeros standing in for one
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_h, _grad_w):
    g_h, g_w = ctx.saved_tensors
    for i, what in ((0, "hidden"), (1, "weight")):
        if ctx.needs_input_grad[i] and not ctx.computed[i]:
            raise RuntimeError(
                f"cohere::linear_cross_entropy: a gradient for {what} is needed but compute_grad_{what}=False "
                f"was passed; call it with compute_grad_{what}=True (linear_cross_entropy() does this)"
            )
    # scaled in place: a trained head's [vocab, hidden] gradient is not copied (a second
    # backward through the same graph then fails autograd's saved-tensor version check)
    grad_h = g_h.mul_(grad_loss.to(g_h.dtype)) if ctx.needs_input_grad[0] else None
    grad_w = g_w.mul_(grad_loss.to(g_w.dtype)) if ctx.needs_input_grad[1] else None
    return grad_h, grad_w, None, None, None, None, None, None


for _op in (linear_cross_entropy_op, linear_cross_entropy_tensor_scale_op):
    _op.register_fake(_fake)
    _op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scale: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """``cross_entropy((hidden @ weight.T) * scale, labels)`` without the logits.

    ``labels`` are the targets of each row (already shifted for a causal LM), int64, with
    ``ignore_index`` for positions that do not count. Differentiable in ``hidden`` and
    ``weight``; returns the fp32 loss. ``reduction="sum"`` then ``/ num_items_in_batch`` is
    how Hugging Face handles gradient accumulation.
    """
    grad = torch.is_grad_enabled()
    loss, _, _ = linear_cross_entropy_op(
        hidden, weight, labels, float(scale), int(ignore_index), reduction,
        grad and hidden.requires_grad, grad and weight.requires_grad,
    )
    return loss


__all__ = ["linear_cross_entropy", "linear_cross_entropy_op"]
