#!/bin/bash
# Does running two pytest processes on one GPU (shared or separate Inductor caches) break cc.generate?
export TRITON_INTERPRET=0 PYTHONPATH=$PWD:/tmp/site
OUT=${OUT:-/tmp/h200_logs}  # the device tool's folder, as in h200.sh
mkdir -p "$OUT"
T="tests/test_gpu_paged.py tests/test_merge_projections.py"
run2() {  # cache dir of process 1, of process 2, label
  rm -rf "$1" "$2"
  TORCHINDUCTOR_CACHE_DIR=$1 python3 -m pytest -q -m gpu $T -k "pdl and False or bf16_decode" -rfE -p no:logging > $OUT/$3_p1.log 2>&1 &
  TORCHINDUCTOR_CACHE_DIR=$2 python3 -m pytest -q -m gpu $T -k "pdl and True" -rfE -p no:logging > $OUT/$3_p2.log 2>&1 &
  wait
  echo "== $3"; grep -h "passed\|failed\|^FAILED" $OUT/$3_p1.log $OUT/$3_p2.log
}
run2 /tmp/ic_shared /tmp/ic_shared shared
run2 /tmp/ic_a /tmp/ic_b separate
run2 /tmp/ic_shared2 /tmp/ic_shared2 shared_again
