"""GPU parity of every backward kernel at Aya-8B sizes (hidden 4096, 32 / 8 heads,
head_dim 128, T 1024) against float64 autograd, and tiny-model training gradients
against eager HF on CUDA. Run on the H200:

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python -m pytest -q -m gpu tests/test_gpu_backward.py
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEV = "cuda"
EPS = 1e-5
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, T, INTER = 4096, 32, 8, 128, 1024, 14336


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _grad_errors(fn_ours, fn_ref, inputs, grads_out):
    ours = [x.detach().requires_grad_() if x is not None else None for x in inputs]
    ref = [x.detach().double().requires_grad_() if x is not None else None for x in inputs]
    out = fn_ours(*ours)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out, grads_out)
    out_ref = fn_ref(*ref)
    out_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    torch.autograd.backward(out_ref, [g.double() for g in grads_out])
    return [_rel(a.grad, b.grad) for a, b in zip(ours, ref) if a is not None]


def _ln(x, w):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + EPS) * w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_and_layer_norm_backward_on_cuda(dtype):
    import cohere_compile  # noqa: F401

    ops = torch.ops.cohere
    g, u = (torch.randn(2, T, INTER, device=DEV, dtype=dtype) for _ in range(2))
    grad = torch.randn(2, INTER, T, device=DEV, dtype=dtype).transpose(1, 2)  # non-contiguous
    errs = _grad_errors(ops.swiglu, lambda g, u: torch.nn.functional.silu(g) * u, [g, u], [grad])
    assert max(errs) < TOL[dtype], errs

    x = torch.randn(2, T, HIDDEN + 7, device=DEV, dtype=dtype)  # odd width: masked columns
    w = 1 + 0.2 * torch.randn(HIDDEN + 7, device=DEV, dtype=dtype)
    gy = torch.randn_like(x)
    errs = _grad_errors(lambda x, w: ops.layer_norm(x, w, EPS), _ln, [x, w], [gy])
    assert max(errs) < TOL[dtype], errs

    r, a, m = (torch.randn(2, T, HIDDEN, device=DEV, dtype=dtype) for _ in range(3))
    w = 1 + 0.2 * torch.randn(HIDDEN, device=DEV, dtype=dtype)
    grads = [torch.randn_like(r), torch.randn_like(r)]

    def ref_add3(r, a, m, w):
        h = r + a + m
        return h, _ln(h, w)

    errs = _grad_errors(lambda r, a, m, w: ops.add3_layer_norm(r, a, m, w, EPS), ref_add3, [r, a, m, w], grads)
    assert max(errs) < TOL[dtype], errs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm", [True, False])
def test_qk_norm_rope_backward_on_cuda(dtype, norm):
    import cohere_compile  # noqa: F401

    q = torch.randn(2, T, HEADS, HEAD_DIM, device=DEV, dtype=dtype).transpose(1, 2)
    k = torch.randn(2, T, KV_HEADS, HEAD_DIM, device=DEV, dtype=dtype).transpose(1, 2)
    qw = 1 + 0.2 * torch.randn(HEADS, HEAD_DIM, device=DEV, dtype=dtype) if norm else None
    kw = 1 + 0.2 * torch.randn(KV_HEADS, HEAD_DIM, device=DEV, dtype=dtype) if norm else None
    ang = (torch.rand(1, T, HEAD_DIM // 2, device=DEV) * 100).repeat_interleave(2, -1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)

    def ref(q, k, qw, kw):
        def rope(x):
            c, s = cos.double()[:, None], sin.double()[:, None]
            return x * c + torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2) * s

        if qw is not None:
            q, k = _ln(q, qw[None, :, None, :]), _ln(k, kw[None, :, None, :])
        return rope(q), rope(k)

    grads = [torch.randn(q.shape, device=DEV, dtype=dtype), torch.randn(k.shape, device=DEV, dtype=dtype)]
    errs = _grad_errors(lambda *a: torch.ops.cohere.qk_norm_rope(*a, cos, sin, EPS), ref, [q, k, qw, kw], grads)
    assert max(errs) < TOL[dtype], errs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mask_kind,causal", [(None, True), ("padding", True), ("bool", False)])
def test_flash_attention_backward_on_cuda(dtype, mask_kind, causal):
    import cohere_compile  # noqa: F401

    b = 2
    q = torch.randn(b, T, HEADS, HEAD_DIM, device=DEV, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, T, KV_HEADS, HEAD_DIM, device=DEV, dtype=dtype).transpose(1, 2)
    v = torch.randn(b, T, KV_HEADS, HEAD_DIM, device=DEV, dtype=dtype).transpose(1, 2)
    mask = None
    if mask_kind == "padding":  # HF's additive mask: row 1 left-padded by 100 tokens
        mask = torch.zeros(b, 1, T, T, device=DEV, dtype=dtype)
        mask[1, :, :, :100] = torch.finfo(dtype).min
    elif mask_kind == "bool":
        mask = torch.rand(b, 1, T, T, device=DEV) > 0.2
    scale = HEAD_DIM ** -0.5

    def ref(q, k, v):
        kr, vr = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
        s = q @ kr.transpose(-1, -2) * scale
        visible = torch.ones_like(s, dtype=torch.bool)
        if mask is not None:
            if mask.dtype == torch.bool:
                visible = visible & mask
            else:
                visible = visible & (mask > torch.finfo(mask.dtype).min / 2)
        if causal:
            visible = visible & torch.ones(T, T, device=DEV, dtype=torch.bool).tril()
        return torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0) @ vr

    grad = torch.randn(b, HEADS, T, HEAD_DIM, device=DEV, dtype=dtype)
    errs = _grad_errors(lambda q, k, v: torch.ops.cohere.flash_attention_lse(q, k, v, mask, scale, causal)[0],
                        ref, [q, k, v], [grad])
    assert max(errs) < TOL[dtype], errs


@pytest.mark.parametrize("use_qk_norm,dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_tiny_model_training_gradients_match_eager_on_cuda(use_qk_norm, dtype):
    import cohere_compile as cc
    from cohere_compile.passes import PASS_NAMES
    from transformers import CohereConfig, CohereForCausalLM

    cfg = CohereConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, use_qk_norm=use_qk_norm,
                       attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = CohereForCausalLM(cfg).to(DEV, dtype).train()
    ids = torch.randint(3, 512, (2, 67), device=DEV)
    am = torch.ones_like(ids)
    am[1, :7] = 0
    labels = ids.masked_fill(am == 0, -100)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, attention_mask=am, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = step()
    cc.optimize(model, passes=PASS_NAMES, training_rewrites=True)
    loss, grads = step()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert _rel(loss, ref_loss) < tol
    errs = {n: _rel(grads[n], ref_grads[n]) for n in ref_grads}
    assert max(errs.values()) < tol, sorted(errs.items(), key=lambda kv: -kv[1])[:3]
