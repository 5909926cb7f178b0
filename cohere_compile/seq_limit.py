"""The longest sequence a model takes, enforced with a clear error.

``FastCohereModel.from_pretrained(max_seq_length=...)`` sets it (extending RoPE past the
checkpoint's ``max_position_embeddings`` when larger); any other model uses its config's
``max_position_embeddings``. A longer input would run at positions the model was not set up for
and give a silently worse answer, so the forward (prompt plus what a ``DynamicCache`` already
holds) and ``cc.generate`` (prompt plus ``max_new_tokens``, before anything runs) raise instead.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .cache.paged_cache import SequenceTooLongError


def max_sequence_length(hf_model: torch.nn.Module) -> tuple[int | None, str]:
    """(limit, where it comes from) for a Hugging Face model (not a peft wrapper)."""
    limit = getattr(hf_model, "max_seq_length", None)
    if limit is not None:
        return int(limit), "max_seq_length"
    return getattr(hf_model.config, "max_position_embeddings", None), "max_position_embeddings"


def too_long_message(what: str, length: int, limit: int, source: str) -> str:
    fix = ("load the model with a larger FastCohereModel.from_pretrained(max_seq_length=...) (RoPE is extended "
           "past the checkpoint's length)" if source == "max_seq_length" else
           "shorten the request, or load the model with FastCohereModel.from_pretrained(max_seq_length=...) to "
           "extend RoPE")
    return f"{what} is {length} tokens, more than the model's {source} {limit}: {fix}"


def enforce_max_seq_length(hf_model: torch.nn.Module, max_seq_length: int) -> None:
    """Set ``hf_model.max_seq_length`` and check every forward against it."""
    hf_model.max_seq_length = int(max_seq_length)
    if getattr(hf_model, "_cohere_length_hook", None) is None:
        hf_model._cohere_length_hook = hf_model.register_forward_pre_hook(_check_forward, with_kwargs=True)


def _check_forward(module, args, kwargs):
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None or x.dim() < 2:
        return None
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if isinstance(cache, DynamicCache) else 0  # shape-based: no sync
    length = past + x.shape[1]
    if length > module.max_seq_length:
        what = f"the forward's sequence ({past} cached + {x.shape[1]} new)" if past else "the forward's input"
        raise SequenceTooLongError(too_long_message(what, length, module.max_seq_length, "max_seq_length"))
    return None
