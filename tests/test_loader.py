"""``cc.FastCohereModel``: from_pretrained (fp32 / bf16 / NF4 / bitsandbytes-4bit checkpoints / RoPE
extension), get_peft_model, for_training / for_inference, on tiny checkpoints saved in the test."""

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import cohere_compile as cc
from cohere_compile.quant import is_quantized
from conftest import make_model, padded_inputs, rel_err, tiny_config
from test_quant import LINEARS, dequantized, dequantized_reference, weight_error

FCM = cc.FastCohereModel


def save_tokenizer(path, vocab_size=128):
    """A word-level tokenizer with <eos>/<unk> but no pad token (what fix_tokenizer must repair)."""
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                unk_token="<unk>")
    fast.save_pretrained(path)


def save_checkpoint(path, cfg=None, seed=0):
    cfg = cfg or tiny_config(False, 2)
    model = make_model(cfg, seed=seed)
    model.save_pretrained(path)
    save_tokenizer(path)
    return model


def save_bnb_checkpoint(path, model):
    """What a ``*-bnb-4bit`` upload holds, written with bitsandbytes' own quantizer and serializer
    (``QuantState.as_dict(packed=True)``, as transformers saves it); returns bnb's dequantized weights."""
    import bitsandbytes.functional as bnbF  # here: the GPU image imports this module without bitsandbytes
    tensors, deq = {}, {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight":  # tied: not saved
            continue
        if name.split(".")[-2] in LINEARS:
            packed, state = bnbF.quantize_4bit(value, blocksize=64, compress_statistics=True, quant_type="nf4")
            tensors[name] = packed
            tensors.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
            deq[name] = bnbF.dequantize_4bit(packed, state)
        else:
            tensors[name] = value.contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                     "bnb_4bit_compute_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    save_tokenizer(path)
    return tensors, deq


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_from_pretrained_full_precision_fp32_and_bf16(tmp_path):
    original = save_checkpoint(tmp_path)
    ids, am = padded_inputs()
    ref = logits(original, input_ids=ids, attention_mask=am)

    model, tok = FCM.from_pretrained(str(tmp_path), load_in_4bit=False, progress=False)
    assert next(model.parameters()).dtype == torch.float32  # dtype auto on CPU
    assert not any(is_quantized(p) for p in model.parameters())
    assert torch.equal(logits(model, input_ids=ids, attention_mask=am), ref)
    # fix_tokenizer: the config's pad id (0, "<unk>" here) becomes the pad token; right padding for training
    assert tok.pad_token_id == model.config.pad_token_id == 0 and tok.padding_side == "right"
    assert tok.model_max_length == model.max_seq_length == 4096

    model, _ = FCM.from_pretrained(str(tmp_path), load_in_4bit=False, dtype=torch.bfloat16, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    keep = am.bool()
    assert rel_err(logits(model, input_ids=ids, attention_mask=am)[keep], ref[keep]) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_pretrained_4bit_is_nf4_within_4bit_error(tmp_path, capsys, dtype):
    cfg = tiny_config(False, 2)
    original = save_checkpoint(tmp_path, cfg)
    capsys.readouterr()
    model, _ = FCM.from_pretrained(str(tmp_path), dtype=dtype, progress=True)  # load_in_4bit=True default
    assert "nf4 quantize: 100%" in capsys.readouterr().err  # the per-layer progress bar
    nf4 = [n for n, p in model.named_parameters() if is_quantized(p)]
    assert len(nf4) == len(LINEARS) * cfg.num_hidden_layers and all(not p.requires_grad for p in model.parameters()
                                                                     if is_quantized(p))
    assert all(type(model.get_parameter(n)).__name__ == "NF4Tensor" and model.get_parameter(n).dtype == dtype
               for n in nf4)
    ids, am = padded_inputs()
    keep = am.bool()
    out = logits(model, input_ids=ids, attention_mask=am)
    deq = logits(dequantized_reference(model, cfg, dtype), input_ids=ids, attention_mask=am)
    assert rel_err(out[keep], deq[keep]) < (1e-5 if dtype == torch.float32 else 1e-2)
    w_err = weight_error(model, original.to(dtype))
    assert 0.03 < w_err < 0.15, w_err
    err = rel_err(out[keep], logits(original, input_ids=ids, attention_mask=am)[keep])
    assert w_err / 4 < err < 2 * w_err, (err, w_err)


def test_bnb_4bit_checkpoint_imports_codes_bit_for_bit(tmp_path, capsys):
    cfg = tiny_config(False, 2)
    # rows a multiple of 64: bnb's native CPU dequantize kernel blocks per row and disagrees with the
    # flat layout (used by its CUDA kernels, its default backend and torchao) when rows are not
    cfg.intermediate_size = 128
    original = make_model(cfg)
    tensors, bnb_deq = save_bnb_checkpoint(tmp_path, original)

    capsys.readouterr()
    model, tok = FCM.from_pretrained(str(tmp_path), progress=True)
    assert "load bnb-4bit: 100%" in capsys.readouterr().err
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert set(bnb_deq) == {n for n, p in model.named_parameters() if is_quantized(p)}
    nf4_codebook = tensors[next(iter(bnb_deq)) + ".quant_map"]
    for name, ref in bnb_deq.items():
        w = model.get_parameter(name)
        assert type(w).__name__ == "NF4Tensor" and w.shape == ref.shape and w.block_size == 64
        # the 4-bit codes and bnb's exact code book, moved over unchanged (no requantization)
        assert torch.equal(w.quantized_data, tensors[name].flatten())
        assert torch.equal(w.nf4, nf4_codebook)
        # only the absmax was re-encoded (bnb 8-bit dynamic -> torchao int8 linear): tiny difference
        assert rel_err(dequantized(w), ref) < 5e-3, name
    ids, am = padded_inputs()
    keep = am.bool()
    out = logits(model, input_ids=ids, attention_mask=am)
    bnb_model = make_model(cfg)
    with torch.no_grad():
        for name, ref in bnb_deq.items():
            bnb_model.get_parameter(name).copy_(ref)
    assert rel_err(out[keep], logits(bnb_model, input_ids=ids, attention_mask=am)[keep]) < 1e-2
    err = rel_err(out[keep], logits(original, input_ids=ids, attention_mask=am)[keep])
    assert 0.01 < err < 0.25, err
    with pytest.raises(ValueError, match="bitsandbytes 4-bit checkpoint"):
        FCM.from_pretrained(str(tmp_path), load_in_4bit=False)


def test_bnb_quant_storage_bf16_is_the_same_bytes():
    """``bnb_4bit_quant_storage=torch.bfloat16`` checkpoints hold the same packed bytes viewed as bf16."""
    import bitsandbytes.functional as bnbF

    from cohere_compile.quant.bnb import bnb_to_nf4

    w = torch.randn(64, 128)
    nf4 = []
    for storage in (torch.uint8, torch.bfloat16):
        packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                           quant_storage=storage)
        assert packed.dtype == storage
        tensors = {"w": packed, **{f"w.{k}": v for k, v in state.as_dict(packed=True).items()}}
        nf4.append(bnb_to_nf4("w", tensors, torch.float32, "cpu"))
    assert torch.equal(nf4[0].quantized_data, nf4[1].quantized_data)
    assert torch.equal(dequantized(nf4[0]), dequantized(nf4[1]))
    assert rel_err(dequantized(nf4[0]), w) < 0.12  # NF4 itself
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="fp4")
    fp4 = {"w": packed, **{f"w.{k}": v for k, v in state.as_dict(packed=True).items()}}
    with pytest.raises(ValueError, match="FP4 bitsandbytes quant state found; only NF4"):
        bnb_to_nf4("w", fp4, torch.float32, "cpu")


def hf_reference(original, rope_parameters):
    cfg = transformers.CohereConfig(**{**original.config.to_dict(), "rope_parameters": rope_parameters})
    ref = transformers.CohereForCausalLM(cfg).eval()
    ref.load_state_dict(original.state_dict())
    return ref


@pytest.mark.parametrize("kind,max_seq_length,rope_scaling", [
    ("linear", 32, {"type": "linear", "factor": 2.0}),
    ("dynamic", 32, {"type": "dynamic", "factor": 2.0}),
    ("linear", 32, None),  # max_seq_length past max_position_embeddings (16): linear, factor 32/16
])
def test_rope_extension_matches_hf_reference(tmp_path, kind, max_seq_length, rope_scaling):
    cfg = tiny_config(False, 2)
    cfg.max_position_embeddings = 16
    original = save_checkpoint(tmp_path, cfg)
    model, _ = FCM.from_pretrained(str(tmp_path), max_seq_length=max_seq_length, load_in_4bit=False,
                                   rope_scaling=rope_scaling, progress=False)
    assert model.config.rope_parameters["rope_type"] == kind and model.config.rope_parameters["factor"] == 2.0
    ids = torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(5))  # twice the 16 limit
    out = logits(model, input_ids=ids)
    theta = original.config.rope_parameters["rope_theta"]
    ref = logits(hf_reference(original, {"rope_type": kind, "factor": 2.0, "rope_theta": theta}), input_ids=ids)
    assert rel_err(out, ref) < 1e-5
    unscaled = logits(original, input_ids=ids)
    # positions past the limit did change (by far more than the 1e-5 agreement with HF above)
    assert rel_err(out[:, 16:], unscaled[:, 16:]) > 3e-4


@pytest.mark.usefixtures("ops_torch_path")
def test_max_seq_length_is_a_limit_with_a_clear_error(tmp_path):
    """Past ``max_seq_length`` the forward (eager and compiled, prompt plus a DynamicCache's
    contents) and cc.generate (before running) raise; up to it they run, also past the
    checkpoint's max_position_embeddings (RoPE extended), which cc.generate used to refuse."""
    cfg = tiny_config(False, 2)
    cfg.max_position_embeddings = 16
    save_checkpoint(tmp_path, cfg)
    model, _ = FCM.from_pretrained(str(tmp_path), max_seq_length=24, load_in_4bit=False, progress=False)
    ids = torch.randint(3, 128, (1, 25), generator=torch.Generator().manual_seed(6))
    assert logits(model, input_ids=ids[:, :24]).shape[1] == 24
    with pytest.raises(cc.SequenceTooLongError, match="input is 25 tokens, more than the model's max_seq_length 24"):
        logits(model, input_ids=ids)
    cache = transformers.DynamicCache(config=model.config)
    logits(model, input_ids=ids[:, :20], past_key_values=cache, use_cache=True)
    with pytest.raises(cc.SequenceTooLongError, match=r"\(20 cached \+ 5 new\) is 25 tokens"):
        logits(model, input_ids=ids[:, 20:], past_key_values=cache, use_cache=True)
    prompt = ids[0, :20].tolist()
    assert len(cc.generate(model, [prompt], 4, stop_tokens=(), compiled=False)[0]) == 4  # 24 > 16 positions
    with pytest.raises(cc.SequenceTooLongError, match="max_new_tokens 5 is 25 tokens, more than the model's "
                                                       "max_seq_length 24"):
        cc.generate(model, [prompt], 5, stop_tokens=(), compiled=False)
    cc.optimize(model, passes=[])
    assert logits(model, input_ids=ids[:, :24]).shape[1] == 24
    with pytest.raises(cc.SequenceTooLongError, match="max_seq_length 24"):
        logits(model, input_ids=ids)


def test_get_peft_model_qlora_step_and_mode_switches(tmp_path):
    save_checkpoint(tmp_path, tiny_config(True, 2))
    model, tok = FCM.from_pretrained(str(tmp_path), progress=False)
    peft_model = FCM.get_peft_model(model, r=4, lora_alpha=8)
    hf = peft_model.get_base_model()
    assert peft_model.training and hf.is_gradient_checkpointing and hf.config.use_cache is False
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(LINEARS) * 2 and all("lora_" in n for n in trainable)
    before = {n: (p.quantized_data.clone() if is_quantized(p) else p.detach().clone())
              for n, p in peft_model.named_parameters()}
    batch = tok(["w3 w4 w5 w6", "w7 w8"], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # LoRA B starts at zero: the second step moves A too
        peft_model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in peft_model.named_parameters():
        now = p.quantized_data if is_quantized(p) else p.detach()
        assert torch.equal(now, before[n]) != (n in trainable), n

    FCM.for_inference(peft_model)
    assert not peft_model.training and not hf.is_gradient_checkpointing and hf.config.use_cache is True
    out = peft_model.generate(**tok(["w3 w4"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 6)
    FCM.for_training(peft_model)
    assert peft_model.training and hf.is_gradient_checkpointing and hf.config.use_cache is False


def test_bad_arguments_and_unknown_architectures(tmp_path):
    llama = tmp_path / "llama"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
    )).save_pretrained(llama)
    with pytest.raises(cc.UnsupportedModelError, match="'llama' model"):
        FCM.from_pretrained(str(llama))
    cohere = tmp_path / "cohere"
    save_checkpoint(cohere)
    path = str(cohere)
    bad = [
        (dict(max_seq_length=0), "max_seq_length must be a positive int"),
        (dict(dtype=torch.int8), "dtype=torch.int8 is not supported"),
        (dict(device_map="tpu"), "device_map='tpu' is not supported"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling type 'yarn' is not supported"),
        (dict(rope_scaling={"type": "linear", "factor": 0.5}), "factor must be a number >= 1"),
        (dict(rope_scaling=2.0), "rope_scaling must be a dict"),
        (dict(load_in_4bit="yes"), "load_in_4bit must be True or False"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            FCM.from_pretrained(path, **kwargs)
    model, _ = FCM.from_pretrained(path, load_in_4bit=False, progress=False)
    for kwargs, message in [(dict(target_modules=["qkv"]), "unknown \\['qkv'\\]"), (dict(r=0), "r must be"),
                            (dict(bias="some"), "bias='some'"), (dict(lora_dropout=1.5), "lora_dropout")]:
        with pytest.raises(ValueError, match=message):
            FCM.get_peft_model(model, **kwargs)
    with pytest.raises(cc.UnsupportedModelError, match="not a Cohere model"):
        FCM.get_peft_model(torch.nn.Linear(2, 2))
