"""GPU checks of the 4-bit paths (run on the H200: ``pytest -m gpu tests/test_gpu_quant.py``):
torchao's tinygemm int4 under our passes, a compiled QLoRA (NF4 + peft) step, and the loader on CUDA."""

import pytest
import torch
import torch.nn.functional as F
import transformers

import cohere_compile as cc
from cohere_compile.quant import is_quantized, quantize_model
from conftest import make_model, padded_inputs, rel_err, with_weights_of

pytestmark = pytest.mark.gpu
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gpu_config(use_qk_norm=False):
    return transformers.CohereConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_qk_norm=use_qk_norm, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def gpu_model(cfg, seed=0):
    return make_model(cfg, torch.bfloat16, seed).cuda()


def dequantized(w: torch.Tensor) -> torch.Tensor:
    """Any 4-bit weight as the dense matrix it multiplies by (tinygemm has no dequantize: apply it to I)."""
    if hasattr(w, "get_original_weight"):
        return w.get_original_weight()
    eye = torch.eye(w.shape[1], device=w.device, dtype=w.dtype)
    return F.linear(eye, w).t().contiguous()


def dequantized_reference(qmodel, cfg):
    return with_weights_of(gpu_model(cfg).to(qmodel.dtype), qmodel, dequantized)


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_int4_tinygemm_optimize_matches_and_rewrites():
    cfg = gpu_config()
    model, original = gpu_model(cfg), gpu_model(cfg)
    ids, am = (t.cuda() for t in padded_inputs(seq=17))
    cc.optimize(model, quantize="int4", group_size=128, passes=cc.PASS_NAMES)
    assert type(model.lm_head.weight).__name__ == "Int4TilePackedTo4dTensor"
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    keep = am.bool()
    out = logits(model, input_ids=ids, attention_mask=am)
    ref = logits(dequantized_reference(model, cfg), input_ids=ids, attention_mask=am)
    assert rel_err(out[keep], ref[keep]) < 2e-2
    err = rel_err(out[keep], logits(original, input_ids=ids, attention_mask=am)[keep])
    assert 0.01 < err < 0.3, err  # int4 groups of 128
    explanation = cc.explain(model, ids, attention_mask=am)
    assert explanation.matches == {"qk_norm_rope": 2, "causal_attention": 0, "attention": 2, "paged_attention": 0,
                                   "swiglu": 2, "layer_norm": 3, "linear_cross_entropy": 0}, str(explanation)
    assert explanation.graph_breaks == 0
    gen = model.generate(ids[:1, -5:], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert (gen[0, 5:] != 0).any(), "int4 model emitted only padding"


def test_int4_gemlite_matches_its_dequantized_weights_and_generates():
    """int4_kernel="gemlite" (torchao's gemlite-backed tensors; needs the gemlite wheel; fp16): every
    linear and the untied head quantized, logits as the dequantized model within fp16 rounding,
    the passes still match, and cc.generate (compiled, CUDA graphs) agrees with its eager path."""
    pytest.importorskip("gemlite", reason="optional: pip install 'cohere_compile[gemlite]' (on the H200: carry its wheel)")
    cfg = gpu_config()
    cfg.logit_scale, cfg.initializer_range = 1.0, 0.2  # sharp logits: greedy picks do not flip on rounding
    model, original = gpu_model(cfg).half(), gpu_model(cfg).half()  # gemlite via torchao: fp16 only
    cc.optimize(model, quantize="int4", int4_kernel="gemlite", group_size=128, passes=cc.PASS_NAMES)
    assert type(model.lm_head.weight).__name__ == "UIntxBitPackedTensor"
    assert all(is_quantized(getattr(model.model.layers[0].mlp, n).weight) for n in ("gate_proj", "up_proj", "down_proj"))
    assert torch.equal(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    ids = torch.randint(3, 1024, (1, 17), device="cuda")
    out = logits(model, input_ids=ids)
    assert rel_err(out, logits(dequantized_reference(model, cfg), input_ids=ids)) < 2e-2
    assert 0.005 < rel_err(out, logits(original, input_ids=ids)) < 0.3  # 4-bit error, not none
    explanation = cc.explain(model, ids)
    assert explanation.matches["swiglu"] == 2 and explanation.graph_breaks == 0, str(explanation)
    prompts = [[5, 9, 33, 7, 100], [11, 3, 60]]
    tokens = cc.generate(model, prompts, 8, stop_tokens=())
    eager = cc.generate(model, prompts, 8, stop_tokens=(), compiled=False)
    assert [t[:4] for t in tokens] == [t[:4] for t in eager], (tokens, eager)


def test_compiled_qlora_step_matches_eager_and_freezes_base():
    from peft import LoraConfig, get_peft_model

    cfg = gpu_config(use_qk_norm=True)
    losses, grads = [], []
    for compiled in (False, True):
        model = gpu_model(cfg)
        quantize_model(model, "nf4")
        torch.manual_seed(3)
        pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LINEARS, init_lora_weights=False))
        if compiled:
            cc.optimize(pm)
        pm.train()
        ids = torch.randint(3, 1024, (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        before = {n: p.quantized_data.clone() for n, p in pm.named_parameters() if is_quantized(p)}
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3).step()
        assert all(torch.equal(p.quantized_data, before[n]) for n, p in pm.named_parameters() if is_quantized(p))
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().float() for n, p in pm.named_parameters() if p.requires_grad]))
    assert abs(losses[0] - losses[1]) / losses[0] < 1e-2
    assert rel_err(grads[1], grads[0]) < 5e-2


def test_from_pretrained_4bit_on_cuda(tmp_path):
    from test_loader import save_tokenizer

    cfg = gpu_config()
    original = gpu_model(cfg).float()
    original.save_pretrained(tmp_path)
    save_tokenizer(tmp_path, vocab_size=1024)
    model, tok = cc.FastCohereModel.from_pretrained(str(tmp_path), progress=False)
    assert next(model.parameters()).device.type == "cuda"
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # dtype auto on an H200
    nf4 = [p for p in model.parameters() if is_quantized(p)]
    assert len(nf4) == len(LINEARS) * 2 and all(p.device.type == "cuda" for p in nf4)
    ids = torch.randint(3, 1024, (1, 33), device="cuda")
    err = rel_err(logits(model, input_ids=ids), logits(original, input_ids=ids))
    assert err < 0.25, err
