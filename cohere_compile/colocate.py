"""Put each decoder layer's q/k/v/gate/up weights back to back in one buffer (Cohere's parallel
block feeds all five the same normed hidden state, so they can be one matmul).

The model stays the same module tree with the same ``Parameter`` objects and values; only where
their data lives changes (``param.data`` becomes a slice of the shared buffer; memory use does
not grow). ``passes/merge_projections.py`` can then compute each group as one matmul over an
``as_strided`` view of the block, which is only valid while the layout holds, so
``cc.generate``, when it merges, calls ``ensure_colocated`` before every run.

Our int4 linears (``Int4TritonLinear``, ``quantize="int4", int4_kernel="triton"``) have no weight
but three buffers (``packed``, ``scales``, ``zeros``); each of the three is co-located the same
way (three blocks per layer, the rows of each linear at the same place in all three), so the
pass can run the group as one ``cohere::int4_linear`` GEMV.
"""

from __future__ import annotations

import torch

# the linears of a decoder layer that share one buffer, in merge order
PROJECTION_GROUP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
INT4_BUFFERS = ("packed", "scales", "zeros")  # Int4TritonLinear's tensors, each co-located


def _plain(w: torch.Tensor) -> bool:
    return type(w) in (torch.Tensor, torch.nn.Parameter)


def _groups(hf_model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """Weight groups that can share a buffer: plain (not quantized) 2-D weights of bias-free
    linears with one dtype, device and input size."""
    groups = []
    for layer in hf_model.get_decoder().layers:
        linears = [layer.get_submodule(name) for name in PROJECTION_GROUP]
        if any(getattr(m, "bias", None) is not None for m in linears):
            continue
        weights = [getattr(m, "weight", None) for m in linears]  # none on our int4 Triton linears
        if any(w is None for w in weights):
            continue
        w0 = weights[0]
        if all(_plain(w) and w.dim() == 2 and w.dtype == w0.dtype and w.device == w0.device
               and w.shape[1] == w0.shape[1] for w in weights):
            groups.append(weights)
    return groups


def _int4_groups(hf_model: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """Layers whose five projections are all our int4 linears of one group size and input size:
    the linears themselves (their buffers are co-located name by name)."""
    from .quant.int4_triton import Int4TritonLinear

    groups = []
    for layer in hf_model.get_decoder().layers:
        linears = [layer.get_submodule(name) for name in PROJECTION_GROUP]
        m0 = linears[0]
        if all(type(m) is Int4TritonLinear and m.group_size == m0.group_size and m.in_features == m0.in_features
               and m.scales.dtype == m0.scales.dtype and m.packed.device == m0.packed.device for m in linears):
            groups.append(linears)
    return groups


def _int4_buffer_lists(linears: list[torch.nn.Module]) -> list[list[torch.Tensor]]:
    return [[getattr(m, name) for m in linears] for name in INT4_BUFFERS]


def _is_colocated(weights: list[torch.Tensor]) -> bool:
    """Back to back, row-major, the first at the start of its storage (the merged graphs read the
    block from there)."""
    if weights[0].storage_offset() != 0:
        return False
    base = weights[0].untyped_storage().data_ptr()
    offset = 0
    for w in weights:
        if not w.is_contiguous() or w.untyped_storage().data_ptr() != base or w.storage_offset() != offset:
            return False
        offset += w.numel()
    return True


def _block_of(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[slice]]:
    """A fresh buffer holding ``tensors`` row-stacked, and each one's rows in it."""
    block = torch.empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), dtype=tensors[0].dtype,
                        device=tensors[0].device)
    rows, start = [], 0
    for t in tensors:
        rows.append(slice(start, start + t.shape[0]))
        block[rows[-1]].copy_(t)
        start += t.shape[0]
    return block, rows


@torch.no_grad()
def ensure_colocated(hf_model: torch.nn.Module) -> int:
    """Co-locate every group that is not (a fresh buffer each, weights copied in, the old storage
    released); returns the number of groups now co-located."""
    groups = _groups(hf_model)
    for weights in groups:
        if not _is_colocated(weights):
            block, rows = _block_of(weights)
            for w, r in zip(weights, rows):
                w.data = block[r]
    int4_groups = _int4_groups(hf_model)
    for linears in int4_groups:
        for name, tensors in zip(INT4_BUFFERS, _int4_buffer_lists(linears)):
            if not _is_colocated(tensors):
                block, rows = _block_of(tensors)
                for m, r in zip(linears, rows):
                    setattr(m, name, block[r])  # a registered buffer: the view replaces it
    return len(groups) + len(int4_groups)


def all_colocated(hf_model: torch.nn.Module) -> bool:
    return (all(_is_colocated(weights) for weights in _groups(hf_model))
            and all(_is_colocated(t) for linears in _int4_groups(hf_model) for t in _int4_buffer_lists(linears)))
