"""GPU parity: every kernel against a float64 reference on CUDA, and the optimized
model against eager HF. Run on the H200 with ``pytest -m gpu``."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernels_match_reference_on_cuda(dtype):
    import cohere_compile  # noqa: F401
    from cohere_compile.ops import reference as R

    tol = 1e-5 if dtype == torch.float32 else 1e-2
    dev = "cuda"
    x = torch.randn(5, 33, 4096 + 7, device=dev, dtype=dtype)
    w = torch.randn(x.shape[-1], device=dev, dtype=dtype)
    assert _rel(torch.ops.cohere.layer_norm(x, w, 1e-5), R.layer_norm(x.double(), w.double(), 1e-5)) < tol
    a, m = torch.randn_like(x), torch.randn_like(x)
    h, out = torch.ops.cohere.add3_layer_norm(x, a, m, w, 1e-5)
    assert _rel(h, x.double() + a.double() + m.double()) < tol
    assert _rel(out, R.layer_norm(h.double(), w.double(), 1e-5)) < tol
    g, u = torch.randn(3, 17, 1431, device=dev, dtype=dtype), torch.randn(3, 17, 1431, device=dev, dtype=dtype)
    assert _rel(torch.ops.cohere.swiglu(g, u), R.swiglu(g.double(), u.double())) < tol
    B, T, H, KV, D = 2, 37, 12, 4, 128
    q = torch.randn(B, T, H, D, device=dev, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, T, KV, D, device=dev, dtype=dtype).transpose(1, 2)
    cos, sin = torch.randn(1, T, D, device=dev, dtype=dtype), torch.randn(1, T, D, device=dev, dtype=dtype)
    qw, kw = torch.randn(H, D, device=dev, dtype=dtype), torch.randn(KV, D, device=dev, dtype=dtype)
    for weights in [(None, None), (qw, kw)]:
        qo, ko = torch.ops.cohere.qk_norm_rope(q, k, *weights, cos, sin, 1e-5)
        dw = [t.double() if t is not None else None for t in weights]
        qr, kr = R.qk_norm_rope(q.double(), k.double(), *dw, cos.double(), sin.double(), 1e-5)
        assert _rel(qo, qr) < tol and _rel(ko, kr) < tol
    v = torch.randn(B, T, KV, D, device=dev, dtype=dtype).transpose(1, 2)
    vis = torch.ones(B, 1, T, T, device=dev, dtype=torch.bool).tril()
    vis[1, :, :, :5] = False
    vis[1, :, :, 0] = True  # every row sees a key
    fmask = torch.where(vis, 0.0, torch.finfo(dtype).min).to(dtype)
    for mask, causal in [(None, True), (vis, False), (fmask, False)]:
        o = torch.ops.cohere.flash_attention(q, k, v, mask, D ** -0.5, causal)
        r = R.flash_attention(q.double(), k.double(), v.double(), mask if mask is None or mask.dtype == torch.bool
                              else mask.double(), D ** -0.5, causal)
        assert _rel(o, r) < tol, (mask is None, causal)


@pytest.mark.parametrize("use_qk_norm", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_optimized_model_matches_eager_on_cuda(use_qk_norm, attn):
    import cohere_compile as cc
    from transformers import CohereConfig, CohereForCausalLM

    cfg = CohereConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, use_qk_norm=use_qk_norm,
                       attn_implementation=attn, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = CohereForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(3, 512, (2, 67), device="cuda")
    am = torch.ones_like(ids)
    am[1, :7] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=am).logits
        cc.optimize(model)
        rep = cc.explain(model, ids, attention_mask=am)
        out = model(ids, attention_mask=am).logits
    assert rep.missing == {}, str(rep)
    assert rep.graph_breaks == 0
    assert _rel(out[0], ref[0]) < 2e-2 and _rel(out[1, 7:], ref[1, 7:]) < 2e-2
