"""Put each decoder layer's projection weights side by side in shared buffers, so that
``passes/merge_projections.py`` can compute a group as one matmul. Cohere's parallel block gives
two groups per layer:

- ``INPUT_GROUP``: q, k, v, gate and up all read the same normed hidden state. Their weights are
  stacked **row-wise** (``[N_q + N_k + ... , K]``): one matmul, each old output a slice of it.
- ``OUTPUT_GROUP``: o and down both add into the same residual (``h = residual + o(a) + down(m)``),
  so ``o(a) + down(m) = [W_o | W_down] @ [a; m]``. Their weights lie **column-wise**
  (``[N, K_o + K_down]``): one matmul over the concatenated inputs yields the sum.

The model stays the same module tree with the same ``Parameter`` objects and values; only where
their data lives changes (``param.data`` becomes a slice of the shared buffer; memory use does
not grow). In the column block, ``o_proj.weight`` and ``down_proj.weight`` are views with a row
stride of ``K_o + K_down``: not contiguous. Matmuls, peft, optimizers, ``torch.save``, ``deepcopy``
and torchao read them as they are (checked on CPU); HF's ``save_pretrained`` does not (its
shared-tensor check views every weight flat), so co-locating wraps the model's ``save_pretrained``
to give those weights their own contiguous storage first.

The merged graphs read the blocks through ``as_strided`` views, which are only valid while the
layout holds, so ``cc.generate``, when it merges, calls ``ensure_colocated`` before every run (the
first run after ``save_pretrained`` co-locates again).
"""

from __future__ import annotations

import torch

# (the dimension the weights are laid side by side along, the linears in block order)
INPUT_GROUP = (0, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"))
OUTPUT_GROUP = (1, ("self_attn.o_proj", "mlp.down_proj"))
GROUPS = (INPUT_GROUP, OUTPUT_GROUP)


def _plain(w: torch.Tensor) -> bool:
    return type(w) in (torch.Tensor, torch.nn.Parameter)


def _groups(hf_model: torch.nn.Module) -> list[tuple[int, list[torch.nn.Parameter]]]:
    """(dim, weights) of the groups that can share a buffer: plain (not quantized) 2-D weights of
    bias-free linears with one dtype and device, of equal size along the other dimension."""
    groups = []
    for layer in hf_model.get_decoder().layers:
        for dim, names in GROUPS:
            linears = [layer.get_submodule(name) for name in names]
            if any(getattr(m, "bias", None) is not None for m in linears):
                continue
            weights = [getattr(m, "weight", None) for m in linears]  # none on our int4 Triton linears
            if any(w is None for w in weights):
                continue
            w0, other = weights[0], 1 - dim
            if all(_plain(w) and w.dim() == 2 and w.dtype == w0.dtype and w.device == w0.device
                   and w.shape[other] == w0.shape[other] for w in weights):
                groups.append((dim, weights))
    return groups


def _block_shape(dim: int, weights: list[torch.Tensor]) -> list[int]:
    shape = list(weights[0].shape)
    shape[dim] = sum(w.shape[dim] for w in weights)
    return shape


def _is_colocated(dim: int, weights: list[torch.Tensor]) -> bool:
    """Each weight is the slice ``block.narrow(dim, start, size)`` of one row-major block that
    starts at the beginning of its storage (the merged graphs read the block from there)."""
    row_stride = _block_shape(dim, weights)[1]
    base = weights[0].untyped_storage().data_ptr()
    offset = 0
    for w in weights:
        if (w.stride() != (row_stride, 1) or w.untyped_storage().data_ptr() != base
                or w.storage_offset() != offset):
            return False
        offset += w.shape[0] * row_stride if dim == 0 else w.shape[1]
    return True


@torch.no_grad()
def ensure_colocated(hf_model: torch.nn.Module) -> int:
    """Co-locate every group that is not (a fresh buffer each, weights copied in, the old storage
    released); returns the number of groups now co-located."""
    groups = _groups(hf_model)
    for dim, weights in groups:
        if _is_colocated(dim, weights):
            continue
        block = torch.empty(_block_shape(dim, weights), dtype=weights[0].dtype, device=weights[0].device)
        start = 0
        for w in weights:
            size = w.shape[dim]
            block.narrow(dim, start, size).copy_(w)
            w.data = block.narrow(dim, start, size)
            start += size
        if dim == 1 and not isinstance(hf_model.__dict__.get("save_pretrained"), SaveWithContiguousWeights):
            hf_model.save_pretrained = SaveWithContiguousWeights(hf_model, hf_model.save_pretrained)
    return len(groups)


@torch.no_grad()
def release_strided(hf_model: torch.nn.Module) -> None:
    """Give every strided (column-block) weight its own contiguous storage again."""
    for dim, weights in _groups(hf_model):
        for w in weights:
            if dim == 1 and not w.is_contiguous():
                w.data = w.data.contiguous()


class SaveWithContiguousWeights:
    """Replaces ``model.save_pretrained``: the column blocks' strided weights become contiguous
    (``release_strided``), then HF saves as usual. A plain object holding the model, so
    ``copy.deepcopy`` re-binds it to the copy."""

    def __init__(self, model: torch.nn.Module, inner):
        self.model, self.inner = model, inner

    def __call__(self, *args, **kwargs):
        release_strided(self.model)
        return self.inner(*args, **kwargs)


def all_colocated(hf_model: torch.nn.Module) -> bool:
    return all(_is_colocated(dim, weights) for dim, weights in _groups(hf_model))
