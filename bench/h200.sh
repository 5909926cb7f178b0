#!/bin/bash
# The H200 runs behind the README's tables, as stages that each fit one 10-minute device call.
# On a 2-GPU machine pass two stages: they run side by side, one per GPU (device time counts
# the machine, not its GPUs). With more stages than GPUs they run one after another, each
# under its own LIMIT (seconds; set it so the sum fits the call). Logs, and the JSON files the
# stages write, are copied to $OUT (the device tool's folder; default /tmp/h200_logs).
#
#   bash bench/h200.sh tests train          # GPU 0: pytest -m gpu; GPU 1: 32-layer LoRA training
#   bash bench/h200.sh quant decode-b1      # int4/bf16 decode; B1 decode vs the loop
#   bash bench/h200.sh decode-ragged hf-generate
#
# torchao (and gemlite, for quant-gemlite) are not installed there: carry their wheels in .whl/
# (see the device notes; gemlite is an sdist: `pip wheel --no-deps gemlite -w .whl`) and they are
# installed into /tmp/site first.
set -u
export TRITON_INTERPRET=0 PYTHONPATH=$PWD:/tmp/site
OUT=${OUT:-/tmp/h200_logs}
mkdir -p "$OUT"
START_MARK=$(mktemp)
# once per set of wheels (two stages started together must not install over each other)
MARK=/tmp/site/.installed-$(ls .whl 2>/dev/null | md5sum | cut -c1-8)
if ls .whl/*.whl > /dev/null 2>&1 && [ ! -e "$MARK" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch "$MARK"
fi
LIMIT=${LIMIT:-570}  # seconds per stage

stage() {
  case "$1" in
    tests) python3 -m pytest -q -m gpu tests -rfE ;;  # over 570 s on a fresh machine (2026-12-03): use tests-a, tests-b
    tests-a) python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_backward.py tests/test_gpu_cross_entropy.py \
               tests/test_gpu_paged.py tests/test_causal_attention.py -rfE ;;
    tests-b) python3 -m pytest -q -m gpu tests/test_gpu_quant.py tests/test_int4_triton.py tests/test_training.py \
               tests/test_generate_default_cache.py tests/test_merge_projections.py -rfE ;;
    tests-generate) python3 -m pytest -q -m gpu tests/test_gpu_paged.py tests/test_generate_default_cache.py \
                      tests/test_merge_projections.py -rfE ;;  # cc.generate's CUDA defaults
    tests-generate-diag) python3 -m pytest -q -x -m gpu tests/test_gpu_paged.py tests/test_generate_default_cache.py \
                           tests/test_merge_projections.py -rfE ;;  # stops at a failure, whose message bisects it
    tests-generate-pdl-diag) python3 -m pytest -q -x -m gpu tests/test_gpu_paged.py -k "greedy_on_cuda or pdl_matches" \
                               -rfE ;;  # the order of 2026-12-04's failure (greedy tests, then the PDL test)
    decode-b1-bucketed) python3 bench/decode.py --layers 32 --workloads b1 --peers ours --rounds 2 \
                          --tag _b1_bucketed ;;  # the default cache's power-of-two pool (4 blocks at B1)
    tests-generate-alone)  # each of 2026-12-02's failing decode tests in a process of its own
      for k in "pdl and False" "pdl and True" "bf16_decode"; do
        python3 -m pytest -q -m gpu tests/test_gpu_paged.py tests/test_merge_projections.py -k "$k" -rfE -p no:logging
      done ;;
    generate-parity) python3 bench/generate_parity.py --repeats 1 ;;  # which setting / case breaks the tokens (~6 min?)
    generate-parity-busy) python3 bench/generate_parity.py --repeats 3 --cases qknorm_gqa --contention --only-busy \
                            --variants default,unmerged,pdl_off --name generate_parity_busy.json ;;  # ~3 min?
    tests-c) python3 -m pytest -q -m gpu tests/test_gpu_backward.py tests/test_gpu_cross_entropy.py -rfE ;;
    train) python3 bench/train.py --layers 32 --peers eager torch_compile cc cc_rewrites ;;
    train-profile) python3 bench/train.py --layers 32 --peers torch_compile cc cc_rewrites --profile \
                     --name train_profile_aya-8b_L32_B4x1024.json ;;  # where a step's time goes, per peer
    train-budget) python3 bench/train.py --layers 32 --peers cc cc_rewrites --activation-memory-budget 0.6 ;;
    train-qlora) python3 bench/quant.py --skip-decode --out quant_aya-8b_L32_train.json ;;
    quant) python3 bench/quant.py --skip-train --variants bf16_generate,int4_generate,int4_triton_generate \
             --out quant_aya-8b_L32_decode.json ;;
    quant-m1) python3 bench/quant.py --skip-train --variants bf16_generate,int4_generate,int4_triton_generate,int4_triton_unmerged_generate \
                --out quant_aya-8b_L32_decode_m1.json ;;  # over one call: each variant's first (compile) run takes ~165 s
    quant-m1-triton) python3 bench/quant.py --skip-train --variants int4_triton_generate,bf16_generate,int4_triton_unmerged_generate \
                       --out quant_aya-8b_L32_decode_m1_triton.json ;;  # ours first; the third may not fit a call
    quant-gemlite) python3 bench/quant.py --skip-train --variants int4_gemlite_generate,bf16_generate \
             --out quant_aya-8b_L32_decode_gemlite.json ;;
    decode-b1) python3 bench/decode.py --layers 32 --workloads b1 --peers loop,ours --tag _b1 ;;
    decode-b1-hf) python3 bench/decode.py --layers 32 --workloads b1 --peers hf_eager,hf_static,loop --tag _b1_hf ;;
    decode-ragged) python3 bench/decode.py --layers 32 --workloads ragged --peers loop,ours --tag _ragged ;;
    hf-generate) python3 bench/hf_generate.py --layers 32 --batch 1 --repeats 2 ;;
    paged-kernel) python3 bench/paged_kernel.py ;;
    int4-gemv) python3 bench/int4_gemv.py --m 1 --sweep ;;
    int4-gemv-m1) python3 bench/int4_gemv.py --m 1 --sweep --out int4_gemv_m1_aya-8b_cuda.json ;;  # the word-wise kernel's knobs
    int4-gemv-stages) python3 bench/int4_gemv.py --m 1 --sweep --shapes merged_qkv_gate_up,down_proj \
                        --out int4_gemv_m1_stages.json ;;  # Triton's cp.async pipeline (stages) vs register prefetch
    int4-gemv-lean) python3 bench/int4_gemv.py --m 1 --sweep --shapes merged_qkv_gate_up,down_proj \
                      --out int4_gemv_m1_lean.json ;;  # the lean step (fewer instructions per weight) vs today's: ~5 min?
    int4-gemv-lean-small) python3 bench/int4_gemv.py --m 1 --sweep --shapes q_o_proj,lm_head \
                            --out int4_gemv_m1_lean_small.json ;;
    int4-gemv-stages-small) python3 bench/int4_gemv.py --m 1 --sweep --shapes q_o_proj,lm_head \
                              --out int4_gemv_m1_stages_small.json ;;
    tests-int4) python3 -m pytest -q -m gpu tests/test_int4_triton.py -rfE ;;
    prefill) python3 bench/prefill.py --try swiglu,attention ;;  # (--ablation: ~18 variants, B1 alone fills a call)
    prefill-profile) python3 bench/prefill.py --batches 1 --no-all --repeats 10 --profile --tag _profile ;;  # ~5 min?
    prefill-plus-b1|prefill-plus-b4)  # does adding layer_norm, qk_norm_rope or merged projections to the default pay?
      python3 bench/prefill.py --batches "${1: -1}" --no-all --try causal_attention,swiglu,+merged \
        --try causal_attention,swiglu,layer_norm --try causal_attention,swiglu,qk_norm_rope \
        --try causal_attention,swiglu,layer_norm,qk_norm_rope,+merged --tag "_plus_b${1: -1}" ;;
    decode-profile) python3 bench/decode_profile.py --layers 32 --gemm --variants ours,ours_unmerged ;;
    decode-b1-variants) python3 bench/decode.py --layers 32 --workloads b1 --peers ours,ours_no_swiglu,ours_rope_write,ours_combo \
                          --tag _b1_variants ;;
    decode-b1-merged) python3 bench/decode.py --layers 32 --workloads b1 --peers ours,ours_unmerged --tag _b1_merged ;;
    decode-b1-rope) python3 bench/decode.py --layers 32 --workloads b1 --peers ours,ours_rope_write --tag _b1_rope ;;
    decode-ragged-rope) python3 bench/decode.py --layers 32 --workloads ragged --peers ours,ours_rope_write \
                          --tag _ragged_rope ;;  # the fused rope + cache write, now with head-chunked launches
    decode-b1-pdl) python3 bench/decode.py --layers 32 --workloads b1 --peers loop,ours,ours_pdl --tag _b1_pdl_optin ;;
    decode-b1-rounds) python3 bench/decode.py --layers 32 --workloads b1 --peers ours,ours_no_pdl --rounds 5 \
                        --tag _b1_rounds ;;  # PDL (default) vs without, interleaved rounds
    decode-ragged-rounds) python3 bench/decode.py --layers 32 --workloads ragged --peers ours,ours_autotune --rounds 3 \
                            --tag _ragged_rounds ;;
    tests-paged-ops) python3 -m pytest -q -m gpu tests/test_gpu_paged.py -k "paged_ops or repeatable" -rfE ;;
    decode-ragged-pdl) python3 bench/decode.py --layers 32 --workloads ragged --peers ours,ours_no_pdl --rounds 2 \
                         --tag _ragged_pdl_default ;;
    tests-pdl) python3 -m pytest -q -m gpu tests/test_pdl.py tests/test_gpu_paged.py -k "pdl or chain" -rfE ;;
    decode-b1-custom-pdl) python3 bench/decode.py --layers 32 --workloads b1 --rounds 3 \
                            --peers ours,ours_inductor_pdl,ours_no_pdl --tag _b1_custom_pdl ;;  # our kernels' PDL too
    decode-ragged-custom-pdl) python3 bench/decode.py --layers 32 --workloads ragged --rounds 2 \
                                --peers ours,ours_inductor_pdl --tag _ragged_custom_pdl ;;
    quant-pdl) python3 bench/quant.py --skip-train \
                 --variants int4_triton_generate,bf16_generate,int4_triton_inductor_pdl_generate \
                 --out quant_aya-8b_L32_decode_custom_pdl.json ;;  # the third may not fit a call
    tests-int4-decode) python3 -m pytest -q -m gpu tests/test_int4_triton.py tests/test_pdl.py \
                         -k "partials or triton_int4_generate or large_m or chain or m1_kernel" -rfE ;;
    quant-split) python3 bench/quant.py --skip-train --variants int4_triton_generate,bf16_generate \
                   --out quant_aya-8b_L32_decode_split_swiglu.json ;;  # 2026-12-04: bf16 did not fit (see README)
    quant-split-ab) python3 bench/quant.py --skip-train --prefill-prompt 0 \
                      --variants int4_triton_generate,int4_triton_unfused_generate,bf16_generate \
                      --out quant_aya-8b_L32_decode_split_ab.json ;;  # the split-K / SwiGLU pass on and off, same process
    profile-int4) python3 bench/decode_profile.py --layers 32 --variants int4_triton --prompt 512 \
                    --name decode_profile_aya-8b_L32_int4_triton.json ;;
    tests-paged) python3 -m pytest -q -m gpu tests/test_gpu_paged.py tests/test_merge_projections.py -rfE ;;
    tests-decode) python3 -m pytest -q -m gpu tests/test_merge_projections.py tests/test_gpu_paged.py \
                    tests/test_causal_attention.py tests/test_gpu.py -rfE ;;  # what 2026-12-02 touched
    decode-ragged-merged) python3 bench/decode.py --layers 32 --workloads ragged --peers ours,ours_unmerged \
                            --tag _ragged_merged ;;
    hf-generate-profile) python3 bench/decode_profile.py --layers 16 --variants hf_paged,hf_dynamic \
                           --prompt 512 --name decode_profile_aya-8b_L16_hf.json ;;
    *) echo "unknown stage $1"; return 2 ;;
  esac
}

gpu=${FIRST_GPU:-0}  # FIRST_GPU=1: this call's stages start on GPU 1 (another script holds GPU 0)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
run_stage() {  # stage name, GPU
  CUDA_VISIBLE_DEVICES=$2 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_$2 timeout "$LIMIT" \
    bash -c "$(declare -f stage); stage $1" > "$OUT/$1.log" 2>&1
  echo "$1: exit $?"
}
if [ "$#" -gt "$((gpus - gpu))" ]; then
  for name in "$@"; do run_stage "$name" "$gpu"; done  # too few GPUs: one after another
else
  for name in "$@"; do run_stage "$name" "$gpu" & gpu=$((gpu + 1)); done
  wait
fi
find bench/results -name '*.json' -newer "$START_MARK" -exec cp {} "$OUT"/ \;  # only this run's
for name in "$@"; do echo "=== $name"; grep -v -i "warn" "$OUT/$name.log" | tail -15; done
