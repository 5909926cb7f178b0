"""Chunked fused linear cross-entropy (the LM head + ``logit_scale`` + causal-LM loss).

The ``[tokens, vocab]`` logits and their gradient never exist in full: tokens are taken a
chunk at a time, ``logits_chunk = h_chunk @ W.T`` comes from cuBLAS (``torch.mm``), and one
Triton launch per chunk turns every row, in place, into ``d loss / d logits`` while it writes
the row's loss. Two more matmuls then give ``grad_h_chunk`` and add into ``grad_W``. The loss
is a scalar, so the gradients are computed here, in the forward; the autograd backward only
scales them by ``grad_output`` (``ops/cross_entropy.py``).

Row math (fp32 whatever the input dtype; ``z`` = raw logits, ``s`` = ``logit_scale``):
``x = s * z``, ``loss = logsumexp(x) - x[label]`` and
``d loss / d z = s * (softmax(x) - onehot(label)) * grad_scale``, where ``grad_scale`` is
``1 / (non-ignored tokens)`` for ``reduction="mean"`` and 1 for ``"sum"``. Rows whose label
is ``ignore_index`` give loss 0 and gradient 0.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from . import next_pow2


@triton.jit
def cross_entropy_rows_kernel(
    logits_ptr, stride_row, labels_ptr, loss_ptr, grad_scale_ptr, n_cols, scale, ignore_index,
    HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)
    cols = tl.arange(0, BLOCK)

    # Pass 1: online max / sum of exp over the vocabulary, block by block.
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    d = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        in_row = offs < n_cols
        x = tl.where(in_row, tl.load(ptr + offs, mask=in_row, other=0.0).to(tl.float32) * scale, float("-inf"))
        m_new = tl.maximum(m, x)
        # lanes that have seen nothing yet stay at -inf; subtracting 0 there keeps their sum 0, not nan
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_ref) + tl.exp(x - m_ref)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(d * tl.exp(m - m_row), 0))
    target = tl.load(ptr + safe_label).to(tl.float32) * scale
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))

    # Pass 2: overwrite the row with its gradient.
    if HAS_GRAD:
        g = tl.load(grad_scale_ptr) * scale
        g = tl.where(valid, g, 0.0)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            in_row = offs < n_cols
            x = tl.load(ptr + offs, mask=in_row, other=0.0).to(tl.float32) * scale
            p = tl.exp(x - lse)
            p = tl.where(offs == safe_label, p - 1.0, p)
            tl.store(ptr + offs, (p * g).to(logits_ptr.dtype.element_ty), mask=in_row)


def _block(n_cols: int) -> int:
    return min(32768, next_pow2(n_cols))


def rows_triton(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, grad_scale: torch.Tensor,
                scale: float, ignore_index: int, with_grad: bool) -> None:
    """One launch for a chunk: writes ``loss`` (fp32, one per row) and, with ``with_grad``,
    replaces ``logits`` by ``d loss / d logits``."""
    rows, n_cols = logits.shape
    if rows == 0:
        return
    block = _block(n_cols)
    cross_entropy_rows_kernel[(rows,)](
        logits, logits.stride(0), labels, loss, grad_scale, n_cols, float(scale), int(ignore_index),
        HAS_GRAD=with_grad, BLOCK=block, num_warps=32 if block >= 32768 else max(4, min(32, block // 1024)),
    )


def rows_torch(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, grad_scale: torch.Tensor,
               scale: float, ignore_index: int, with_grad: bool) -> None:
    """The same contract in plain torch (the CPU path when Triton is not interpreting).
    Materialises one fp32 chunk at a time, never more."""
    x = logits.float() * scale
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(x, dim=1)
    target = x.gather(1, safe[:, None]).squeeze(1)
    loss.copy_(torch.where(valid, lse - target, 0.0))
    if with_grad:
        p = torch.exp(x.sub_(lse[:, None]))
        p[torch.arange(p.shape[0], device=p.device), safe] -= 1.0
        p.mul_(torch.where(valid, grad_scale * scale, 0.0)[:, None])
        logits.copy_(p)


def chunk_rows(n_rows: int, n_cols: int, element_size: int, budget_bytes: int) -> int:
    """Rows per chunk so that one chunk of logits stays within ``budget_bytes``; a multiple
    of 128 when that large (whole matmul tiles)."""
    rows = budget_bytes // max(1, n_cols * element_size)
    if rows >= 128:
        rows -= rows % 128
    return max(1, min(n_rows, rows))


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    ignore_index: int,
    reduction: str,
    grad_hidden: bool,
    grad_weight: bool,
    rows_per_chunk: int,
    rows_fn: Callable = rows_triton,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """hidden [N, H], weight [V, H], labels [N] (int64, already shifted) ->
    (loss fp32 0-d, grad_hidden [N, H] or None, grad_weight [V, H] or None)."""
    n, _ = hidden.shape
    vocab = weight.shape[0]
    row_loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if reduction == "mean":
        # divides by the non-ignored count (0 of them gives nan, as torch's cross_entropy)
        count = (labels != ignore_index).sum().to(torch.float32)
        grad_scale = 1.0 / count
    else:
        count = None
        grad_scale = torch.ones((), dtype=torch.float32, device=hidden.device)
    with_grad = grad_hidden or grad_weight
    g_hidden = torch.empty_like(hidden) if grad_hidden else None
    g_weight = torch.zeros_like(weight) if grad_weight else None
    wt = weight.t()
    rows = max(1, min(n, rows_per_chunk))
    buf = torch.empty((rows, vocab), dtype=torch.result_type(hidden, weight), device=hidden.device)
    for start in range(0, n, rows):
        end = min(n, start + rows)
        h = hidden[start:end]
        logits = buf[: end - start]
        torch.mm(h, wt, out=logits)
        rows_fn(logits, labels[start:end], row_loss[start:end], grad_scale, scale, ignore_index, with_grad)
        if grad_hidden:
            torch.mm(logits, weight, out=g_hidden[start:end])
        if grad_weight:
            g_weight.addmm_(logits.t(), h)
    loss = row_loss.sum()
    if count is not None:
        loss = loss / count
    return loss, g_hidden, g_weight
