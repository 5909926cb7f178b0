"""Training steps that do not return logits, so the ``[tokens, vocab]`` logits can vanish.

``CohereForCausalLM.forward`` returns the logits along with the loss. As long as they are a
graph output they must be materialised, and the ``linear_cross_entropy`` pass cannot fire
(its pattern's intermediate has a user outside it). ``optimize`` therefore wraps the model's
``forward``: in training mode with ``labels`` given, it returns the output without logits
(``out.logits is None``). The wrapper, not a forward hook, because Dynamo runs module hooks
outside the compiled frame (``model.compile`` / ``torch.compile(model)`` capture the
``forward`` frame): a hook would drop the logits only after the graph has produced them.
Eval mode, calls without labels and ``return_dict=False`` tuples are left untouched.

Opt out with ``cc.optimize(model, ..., keep_training_logits=True)``: logits are returned, the
pass does not fire on that graph, and loss and gradients are Inductor's.
"""

from __future__ import annotations

import inspect

import torch

# CohereForCausalLM.forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels, ...)
_LABELS_POSITION = 5


class ForwardWithoutTrainingLogits:
    """Replaces ``module.forward``; keeps its signature (HF ``Trainer`` reads it) and survives
    ``copy.deepcopy`` (the bound method is re-bound to the copy)."""

    def __init__(self, module: torch.nn.Module, inner):
        self.module = module
        self.inner = inner
        self.__signature__ = inspect.signature(inner)

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        labels = kwargs.get("labels", args[_LABELS_POSITION] if len(args) > _LABELS_POSITION else None)
        if not self.module.training or labels is None:
            return out
        if not hasattr(out, "items") or out.get("loss") is None or out.get("logits") is None:
            return out
        # A new ModelOutput without the key (``out.logits = None`` would keep it in the dict).
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})


def drop_training_logits(model: torch.nn.Module, enabled: bool = True) -> None:
    """Wrap (or, with ``enabled=False``, unwrap) ``model.forward``. Idempotent."""
    current = model.__dict__.get("forward")
    if isinstance(current, ForwardWithoutTrainingLogits):
        if enabled:
            return
        if current.inner == getattr(type(model), "forward").__get__(model):
            del model.forward  # back to the class's method
        else:
            model.forward = current.inner
        return
    if enabled:
        model.forward = ForwardWithoutTrainingLogits(model, model.forward)
