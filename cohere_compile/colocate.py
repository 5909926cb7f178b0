"""Put each decoder layer's q/k/v/gate/up weights back to back in one buffer (Cohere's parallel
block feeds all five the same normed hidden state, so they can be one matmul).

The model stays the same module tree with the same ``Parameter`` objects and values; only where
their data lives changes (``param.data`` becomes a slice of the shared buffer; memory use does
not grow). ``passes/merge_projections.py`` can then compute each group as one matmul over an
``as_strided`` view of the block, which is only valid while the layout holds, so
``cc.generate``, when it merges, calls ``ensure_colocated`` before every run.
"""

from __future__ import annotations

import torch

# the linears of a decoder layer that share one buffer, in merge order
PROJECTION_GROUP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


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


@torch.no_grad()
def ensure_colocated(hf_model: torch.nn.Module) -> int:
    """Co-locate every group that is not (a fresh buffer each, weights copied in, the old storage
    released); returns the number of groups now co-located."""
    groups = _groups(hf_model)
    for weights in groups:
        if _is_colocated(weights):
            continue
        block = torch.empty((sum(w.shape[0] for w in weights), weights[0].shape[1]),
                            dtype=weights[0].dtype, device=weights[0].device)
        start = 0
        for w in weights:
            rows = w.shape[0]
            block[start:start + rows].copy_(w)
            w.data = block[start:start + rows]
            start += rows
    return len(groups)


def all_colocated(hf_model: torch.nn.Module) -> bool:
    return all(_is_colocated(weights) for weights in _groups(hf_model))
