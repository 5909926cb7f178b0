"""cohere_compile: FX graph rewrites that make Hugging Face Cohere models fast under
torch.compile, without touching the model's code.

    import cohere_compile as cc
    model = cc.optimize(model)              # same object, compiled with our passes
    print(cc.explain(model, input_ids))     # rewrites per pass, graph breaks
    torch.compile(model, backend="cohere")  # or through torch.compile directly
"""

from .api import CompileOptions, UnsupportedModelError, optimize
from .backend import cohere_backend
from .explain import Explanation, explain
from .ops import UnsupportedInputError
from .ops.cross_entropy import linear_cross_entropy
from .passes import DEFAULT_PASSES, PASS_NAMES

__version__ = "0.1.0"

__all__ = [
    "optimize",
    "explain",
    "Explanation",
    "CompileOptions",
    "cohere_backend",
    "PASS_NAMES",
    "DEFAULT_PASSES",
    "UnsupportedModelError",
    "UnsupportedInputError",
    "linear_cross_entropy",
]
