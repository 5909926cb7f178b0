"""The ``attention`` pass's causal route: where HF's mask is plain causality built from sizes
alone (no padding, no cache prefix), attention becomes ``cohere::causal_attention`` (SDPA with
``is_causal``, FlashAttention on CUDA); any other mask keeps ``cohere::flash_attention``.
The mask check (``passes/causal_mask.py``) on traced graphs, the op against the reference, and
end to end against eager HF."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from transformers import DynamicCache

import cohere_compile as cc
import cohere_compile.passes.attention as attention_pass
from cohere_compile.ops import reference
from cohere_compile.passes import recording
from cohere_compile.passes.causal_mask import is_plain_causal
from conftest import make_model, rel_err, tiny_config


def mask_node(fn, *example):
    """Trace ``fn`` with symbolic sizes; its output node's input is the mask."""
    gm = make_fx(fn, tracing_mode="symbolic")(*example)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]


def causal_from_sizes(x):
    s = x.shape[1]
    i = torch.arange(s)
    return (i[None, :] <= i[:, None])[None, None].expand(x.shape[0], 1, s, s)


def additive_causal(x):
    allowed = causal_from_sizes(x)
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def additive_finite(bias):
    """HF's additive mask as built on CUDA: a finite bias (-65536 in bf16) instead of -inf."""
    def fn(x):
        allowed = causal_from_sizes(x)
        return torch.zeros(allowed.shape, dtype=torch.bfloat16).masked_fill(~allowed, bias)
    return fn


def sliding_window(x):
    s, window = x.shape[1], 4
    i = torch.arange(s)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)


def padded(x):
    return causal_from_sizes(x) & (x != 0)[:, None, None, :]


def with_prefix(x):
    s, past = x.shape[1], 2
    q, kv = torch.arange(past, past + s), torch.arange(past + s)
    return kv[None, :] <= q[:, None]


@pytest.mark.parametrize("fn,want", [
    (causal_from_sizes, True),
    (additive_causal, True),
    (additive_finite(-65536.0), True),
    (additive_finite(-1.0), False),  # a bias too small to mask
    (sliding_window, False),  # causal at the traced size 3; the size 3 larger shows the window
    (padded, False),  # reads the input's data
    (with_prefix, False),  # not square
    (lambda x: torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), False),  # bidirectional
])
def test_mask_check_accepts_only_size_only_causality(fn, want):
    x = torch.randint(1, 5, (2, 3))
    assert is_plain_causal(mask_node(fn, x)) is want


@pytest.mark.parametrize("heads,kv_heads,dtype", [(4, 2, torch.float32), (6, 6, torch.float32), (4, 1, torch.bfloat16)])
def test_causal_attention_op_matches_the_reference(heads, kv_heads, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 11, heads, 16, generator=g).to(dtype).transpose(1, 2)  # HF's (B, H, S, D) view
    k, v = (torch.randn(2, kv_heads, 11, 16, generator=g).to(dtype) for _ in range(2))
    out = torch.ops.cohere.causal_attention(q, k, v, 0.3)
    want = reference.flash_attention(q, k, v, None, 0.3, True)
    assert rel_err(out, want) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert out.transpose(1, 2).is_contiguous()  # the layout its fake promises the compiler
    with pytest.raises(ValueError, match="same length"):
        torch.ops.cohere.causal_attention(q, k[:, :, :5], v[:, :, :5], 0.3)


@pytest.fixture
def routes(monkeypatch):
    """Which route each rewritten SDPA took (True: causal_attention)."""
    taken = []
    real = attention_pass._plain_causal
    monkeypatch.setattr(attention_pass, "_plain_causal", lambda *a: taken.append(real(*a)) or taken[-1])
    return taken


def run(model, **inputs):
    with torch.no_grad(), recording() as rewrites, torch._inductor.config.patch(force_disable_caches=True):
        out = model(**inputs)
    return out, rewrites


@pytest.mark.parametrize("kv_heads,dynamic", [(2, False), (4, True)])
def test_unmasked_prompt_takes_the_causal_route_and_matches_eager(kv_heads, dynamic, routes):
    ref, model = make_model(tiny_config(True, kv_heads)), make_model(tiny_config(True, kv_heads))
    cc.optimize(model, passes=["attention"], dynamic=dynamic)
    for seq in (7, 12) if dynamic else (7,):  # dynamic: the second length reuses the graph
        ids = torch.randint(3, 128, (2, seq), generator=torch.Generator().manual_seed(seq))
        out, rewrites = run(model, input_ids=ids)
        assert rel_err(out.logits, ref(input_ids=ids).logits) < 1e-4
    assert routes == [True, True]  # one graph, two layers
    assert [r["attention"] for r in rewrites] == ([] if dynamic else [2])  # (dynamic: compiled at 7)


@pytest.mark.usefixtures("ops_torch_path")
def test_padding_and_cache_prefix_keep_the_masked_kernel(routes):
    ref, model = make_model(tiny_config(False, 2)), make_model(tiny_config(False, 2))
    cc.optimize(model, passes=["attention"])
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, :3] = 0
    out, _ = run(model, input_ids=ids, attention_mask=am)
    want = ref(input_ids=ids, attention_mask=am).logits
    assert rel_err(out.logits[am.bool()], want[am.bool()]) < 1e-4
    assert routes == [False, False]
    routes.clear()
    # a continuation: 4 new tokens after a 5-token prefix in the cache (not square)
    caches = [DynamicCache(config=m.config) for m in (ref, model)]
    with torch.no_grad():
        ref(input_ids=ids[:, :5], past_key_values=caches[0], use_cache=True)
        model(input_ids=ids[:, :5], past_key_values=caches[1], use_cache=True)
    routes.clear()
    out, _ = run(model, input_ids=ids[:, 5:], past_key_values=caches[1], use_cache=True)
    want = ref(input_ids=ids[:, 5:], past_key_values=caches[0], use_cache=True).logits
    assert rel_err(out.logits, want) < 1e-4
    assert routes and not any(routes)


def test_training_graphs_turn_a_plain_causal_mask_into_is_causal(routes):
    """Training (the SDPA forward/backward pair -> our flash_attention_lse / _backward): a plain
    causal mask becomes the kernels' is_causal (no mask read, blocks above the diagonal
    skipped); loss and every gradient as eager."""
    ref, model = make_model(tiny_config(False, 2)), make_model(tiny_config(False, 2))
    ref.train(), model.train()
    cc.optimize(model, passes=["attention"], training_rewrites=True)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    with recording() as rewrites, torch._inductor.config.patch(force_disable_caches=True):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    want = ref(input_ids=ids, labels=ids).loss
    want.backward()
    assert rewrites == [{"attention": 2}] and routes == [True, True]
    assert rel_err(loss, want) < 1e-5
    grads = {n: p.grad for n, p in ref.named_parameters()}
    assert all(rel_err(p.grad, grads[n]) < 1e-4 for n, p in model.named_parameters())


@pytest.mark.parametrize("attn,kv_heads", [("sdpa", 2), ("eager", 4)])
def test_causal_attention_pass_is_default_and_takes_only_plain_causality(attn, kv_heads):
    """The ``causal_attention`` pass (on by default): the attention of a prompt without mask or
    cache, for HF's sdpa and eager attention, GQA and MHA; logits as eager."""
    ref, model = make_model(tiny_config(True, kv_heads, attn)), make_model(tiny_config(True, kv_heads, attn))
    cc.optimize(model)
    assert "causal_attention" in cc.DEFAULT_PASSES and "attention" not in cc.DEFAULT_PASSES
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    out, rewrites = run(model, input_ids=ids)
    with torch.no_grad():
        assert rel_err(out.logits, ref(input_ids=ids).logits) < 1e-4
    assert [r["causal_attention"] for r in rewrites] == [2] and "attention" not in rewrites[0]
    rep = cc.explain(model, ids)
    assert rep.matches["causal_attention"] == rep.expected["causal_attention"] == 2 and rep.missing == {}
    # padded inputs: 0 rewrites, 0 expected (test_passes.py::test_default_passes); a cache prefix:
    # the same mask check (test_padding_and_cache_prefix_keep_the_masked_kernel)


def test_with_both_passes_causal_attention_takes_the_causal_attention_first():
    model = cc.optimize(make_model(tiny_config(False, 2)), passes=["causal_attention", "attention"])
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    rep = cc.explain(model, ids)
    assert (rep.matches["causal_attention"], rep.matches["attention"]) == (2, 0)
    assert rep.expected["attention"] == 0 and rep.missing == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_causal_route_on_cuda_bf16(routes):
    """On CUDA, SDPA with a mask lowers to the efficient / cuDNN kernels: the same check applies,
    and the causal route (FlashAttention) matches eager within bf16 rounding."""
    ref = make_model(tiny_config(True, 2), torch.bfloat16).cuda()
    model = cc.optimize(make_model(tiny_config(True, 2), torch.bfloat16).cuda(), passes=["attention"])
    ids = torch.randint(3, 128, (2, 33), device="cuda")
    out, rewrites = run(model, input_ids=ids)
    assert rewrites == [{"attention": 2}] and routes == [True, True]
    with torch.no_grad():
        assert rel_err(out.logits.float(), ref(input_ids=ids).logits.float()) < 2e-2
