"""``cc.optimize(model, quantize="int4" | "nf4")`` on tiny Cohere models (CPU configs of torchao).

Two references per model: the unquantized model (logits within the 4-bit error, a bound derived
from the measured weight error) and a plain model holding the *dequantized* 4-bit weights (the
quantized model must compute exactly that, so fp32 tolerances apply)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import cohere_compile as cc
from cohere_compile.quant import gemlite_config, int4_config, is_quantized, quantize_model
from cohere_compile.passes import PASS_NAMES
from conftest import make_model, padded_inputs, rel_err, tiny_config, with_weights_of

GROUP = 32  # tiny hidden size 64: the int4 group must divide every in_features
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = {"qk_norm_rope": 2, "causal_attention": 0, "attention": 2, "paged_attention": 0, "swiglu": 2, "layer_norm": 3,
        "linear_cross_entropy": 0}  # no paged cache here


def dequantized(w: torch.Tensor) -> torch.Tensor:
    return w.get_original_weight() if hasattr(w, "get_original_weight") else w.dequantize()


def quantized_linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def dequantized_reference(qmodel, cfg, dtype):
    """A plain HF model holding the quantized model's dequantized weights (untied head)."""
    return with_weights_of(make_model(cfg, dtype), qmodel, dequantized)


def weight_error(qmodel, model_ref) -> float:
    """Relative error of all quantized weights together: what 4-bit costs on this model."""
    ref = dict(model_ref.named_parameters(remove_duplicate=False))
    pairs = [(dequantized(p), ref[n]) for n, p in qmodel.named_parameters() if is_quantized(p)]
    num = sum((q.double() - r.double()).pow(2).sum() for q, r in pairs)
    den = sum(r.double().pow(2).sum() for _, r in pairs)
    return float((num / den).sqrt())


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_unties_head_keeps_embedding_and_stays_within_4bit_error(dtype):
    cfg = tiny_config(False, 2)
    model, original = make_model(cfg, dtype), make_model(cfg, dtype)
    ids, am = padded_inputs()
    ref = logits(original, input_ids=ids, attention_mask=am)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied before

    quantize_model(model, "int4", group_size=GROUP)

    # the 256k-style embedding is a plain lookup, bit-identical; the head is its own int4 copy
    emb = model.model.embed_tokens.weight
    assert type(emb) is torch.nn.Parameter and torch.equal(emb, original.model.embed_tokens.weight)
    assert model.lm_head.weight is not emb and is_quantized(model.lm_head.weight)
    assert model.config.tie_word_embeddings is False
    model.tie_weights()  # HF must not re-tie them (that would put the int4 tensor into the lookup)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    n_quant = sum(is_quantized(m.weight) for _, m in quantized_linears(model))
    assert n_quant == len(LINEARS) * cfg.num_hidden_layers + 1

    out = logits(model, input_ids=ids, attention_mask=am)
    keep = am.bool()
    # the model computes exactly what its dequantized weights say
    deq = logits(dequantized_reference(model, cfg, dtype), input_ids=ids, attention_mask=am)
    assert rel_err(out[keep], deq[keep]) < (1e-5 if dtype == torch.float32 else 1e-2)
    # and differs from the unquantized model by about the 4-bit weight error (measured ~0.1 for
    # groups of 32); logits errors stay within 2x the weight error through 2 layers + head
    w_err = weight_error(model, original)
    assert 0.03 < w_err < 0.2, w_err
    err = rel_err(out[keep], ref[keep])
    assert w_err / 4 < err < 2 * w_err, (err, w_err)


def test_int4_greedy_generation_matches_dequantized_reference():
    cfg = tiny_config(False, 2)
    model = make_model(cfg)
    quantize_model(model, "int4", group_size=GROUP)
    ref = dequantized_reference(model, cfg, torch.float32)
    prompt = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    out, out_ref = model.generate(prompt, **kw), ref.generate(prompt, **kw)
    assert torch.equal(out, out_ref)
    new = out[0, prompt.shape[1]:]
    assert (new != cfg.pad_token_id).any(), "quantized model emitted only padding"


@pytest.mark.parametrize("method", ["int4", "nf4"])
def test_optimize_quantized_rewrites_everything_and_matches(method):
    """Passes still match on quantized weights: exact rewrite counts, logits as eager."""
    cfg = tiny_config(False, 2)
    model = make_model(cfg)
    ids, am = padded_inputs()
    kw = {"group_size": GROUP} if method == "int4" else {}
    assert cc.optimize(model, quantize=method, passes=PASS_NAMES, **kw) is model
    ref = logits(dequantized_reference(model, cfg, torch.float32), input_ids=ids, attention_mask=am)
    out = logits(model, input_ids=ids, attention_mask=am)
    keep = am.bool()
    assert rel_err(out[keep], ref[keep]) < 1e-4
    explanation = cc.explain(model, ids, attention_mask=am)
    assert explanation.matches == FULL, str(explanation)
    assert explanation.graph_breaks == 0, explanation.break_reasons


def test_nf4_qlora_step_updates_only_adapters():
    cfg = tiny_config(True, 2)
    model, original = make_model(cfg), make_model(cfg)
    quantize_model(model, "nf4")
    # NF4 keeps the head tied and unquantized; every decoder linear is NF4
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(is_quantized(m.weight) for n, m in quantized_linears(model) if n != "lm_head")
    w_err = weight_error(model, original)
    assert 0.03 < w_err < 0.15, w_err  # NF4, blocks of 64
    ids, am = padded_inputs()
    keep = am.bool()
    err = rel_err(logits(model, input_ids=ids, attention_mask=am)[keep],
                  logits(original, input_ids=ids, attention_mask=am)[keep])
    assert w_err / 4 < err < 2 * w_err, (err, w_err)

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS, init_lora_weights=False))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: (p.quantized_data.clone() if hasattr(p, "quantized_data") else p.detach().clone())
              for n, p in peft_model.named_parameters()}
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    peft_model(input_ids=ids, attention_mask=am, labels=ids).loss.backward()
    opt.step()
    for n, p in peft_model.named_parameters():
        now = p.quantized_data if hasattr(p, "quantized_data") else p.detach()
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert not torch.equal(now, before[n]), f"adapter {n} did not move"
        else:
            assert p.grad is None, n
            assert torch.equal(now, before[n]), f"base weight {n} changed"


def test_bad_arguments_raise_clear_errors():
    model = make_model(tiny_config(False, 2))
    with pytest.raises(ValueError, match="quantize='int8' is not supported"):
        quantize_model(model, "int8")
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_model(model, "int4", group_size=48)
    with pytest.raises(ValueError, match="in_features=64, not a multiple of group_size=128"):
        quantize_model(model, "int4", group_size=128)
    assert not any(is_quantized(p) for p in model.parameters())  # nothing half-done
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="group_size=64 applies to quantize='int4' only"):
        cc.optimize(model, group_size=64)
    with pytest.raises(cc.UnsupportedInputError, match="needs bfloat16"):
        int4_config(torch.device("cuda"), torch.float16, 128)
    quantize_model(model, "nf4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int4", group_size=GROUP)
    peft_model = get_peft_model(make_model(tiny_config(False, 2)), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        cc.optimize(peft_model, quantize="nf4")


def test_gemlite_int4_kernel_refuses_what_it_cannot_run(monkeypatch):
    """int4_kernel="gemlite" (CUDA only; tested on the GPU in test_gpu_quant.py): a CPU model, a
    float32 model and a missing gemlite package each get an error that names the fix, before
    any weight changes."""
    model = make_model(tiny_config(False, 2))
    with pytest.raises(cc.UnsupportedInputError, match="int4_kernel='gemlite' runs gemlite's Triton kernels on CUDA"):
        cc.optimize(model, quantize="int4", int4_kernel="gemlite", group_size=GROUP)
    assert not any(is_quantized(p) for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(cc.UnsupportedInputError, match="needs float16 weights .* model.half()"):
            gemlite_config(torch.device("cuda"), dtype, 128)
    with pytest.raises(ValueError, match="group_size=48"):
        gemlite_config(torch.device("cuda"), torch.float16, 48)
    monkeypatch.setitem(__import__("sys").modules, "gemlite", None)  # as if not installed
    with pytest.raises(ImportError, match="needs the gemlite package: pip install"):
        gemlite_config(torch.device("cuda"), torch.float16, 128)
    # gemlite 0.6 changed its layers' tensors; torchao 0.18 cannot read them (found on the H200)
    import importlib.metadata
    import types

    import torchao

    monkeypatch.setitem(__import__("sys").modules, "gemlite", types.ModuleType("gemlite"))
    monkeypatch.setattr(torchao, "__version__", "0.18.0")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: {"gemlite": "0.6.0.post2"}[name])
    with pytest.raises(ImportError, match=r"gemlite 0.6.0.post2 is installed .*pip install 'gemlite>=0.5,<0.6'"):
        gemlite_config(torch.device("cuda"), torch.float16, 128)
    with pytest.raises(ValueError, match="int4_kernel='gemlite' applies to quantize='int4' only"):
        cc.optimize(model, int4_kernel="gemlite")


@pytest.mark.usefixtures("ops_torch_path")
def test_compiled_qlora_training_step_matches_eager():
    """cc.optimize on a QLoRA model (NF4 base, peft LoRA): loss and adapter gradients as eager, base
    weights frozen. (Gradient checkpointing off here only to halve the CPU compile time; with it on
    the same comparison matched to 7e-7 when checked by hand, and bench/quant.py trains with it.)"""
    results = []
    for compiled in (False, True):
        model = make_model(tiny_config(True, 2, layers=1))  # one layer: the training compile is the slow part
        quantize_model(model, "nf4")
        torch.manual_seed(3)
        peft_model = cc.FastCohereModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False,
                                                       use_gradient_checkpointing=False)
        step = cc.optimize(peft_model) if compiled else peft_model
        ids, am = padded_inputs(seq=16)
        before = {n: p.quantized_data.clone() for n, p in peft_model.named_parameters() if is_quantized(p)}
        loss = step(input_ids=ids, attention_mask=am, labels=ids).loss
        loss.backward()
        assert all(p.grad is None for p in peft_model.parameters() if not p.requires_grad)
        assert all(torch.equal(p.quantized_data, before[n]) for n, p in peft_model.named_parameters()
                   if is_quantized(p))
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in peft_model.parameters()
                                                  if p.requires_grad])))
    (loss_eager, grad_eager), (loss_compiled, grad_compiled) = results
    assert rel_err(loss_compiled, loss_eager) < 1e-5
    assert grad_eager.abs().sum() > 0 and rel_err(grad_compiled, grad_eager) < 1e-4
