"""cohere_compile: FX graph rewrites that make Hugging Face Cohere models fast under
torch.compile, without touching the model's code.

    import cohere_compile as cc
    model = cc.optimize(model)              # same object, compiled with our passes
    print(cc.explain(model, input_ids))     # rewrites per pass, graph breaks
    torch.compile(model, backend="cohere")  # or through torch.compile directly
    cc.optimize(model, quantize="int4")      # torchao 4-bit weights ("nf4" for QLoRA)
    model, tok = cc.FastCohereModel.from_pretrained(path, load_in_4bit=True)
"""

from .api import CompileOptions, UnsupportedModelError, optimize
from .backend import cohere_backend
from .cache import CacheCapacityError, PagedKVCache, SequenceTooLongError
from .explain import Explanation, explain
from .fast_model import FastCohereModel
from .generate import generate
from .ops import UnsupportedInputError
from .ops.cross_entropy import linear_cross_entropy
from .passes import DEFAULT_PASSES, PASS_NAMES
from .quant.int4_triton import Int4TritonLinear

__version__ = "0.1.0"

__all__ = [
    "optimize",
    "explain",
    "FastCohereModel",
    "Explanation",
    "CompileOptions",
    "cohere_backend",
    "PASS_NAMES",
    "DEFAULT_PASSES",
    "UnsupportedModelError",
    "UnsupportedInputError",
    "PagedKVCache",
    "CacheCapacityError",
    "SequenceTooLongError",
    "generate",
    "linear_cross_entropy",
    "Int4TritonLinear",
]
