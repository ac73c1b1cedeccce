#!/usr/bin/env bash
# Build, test and benchmark sparsek on a CUDA machine in one go; prints a short table last.
#   bash tools/gpu_check.sh [stage ...]     stages: build tests bench bench-quick extra pdl (default: build tests bench)
# extra = the sparse, paged-decode and xFormers benchmarks of the packages; pdl = programmatic dependent launch on/off.
# Logs and tables go to $OUT (default ./gpu_out). Uses the source tree directly (PYTHONPATH), so nothing is installed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export SPARSEK_CACHE_DIR=${SPARSEK_CACHE_DIR:-$PWD/.sk_cache}
SRC=$PWD/packages/sparsek-kernels/src:$PWD/packages/sparsek-xformers/src:$PWD/packages/sparsek-vllm/src:$PWD/packages/sparsek-flashcore-compat/src
export PYTHONPATH=$SRC${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
stages=${*:-build tests bench}
summary=()

has() { [[ " $stages " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/gpu.txt"

if has build; then
  t0=$(date +%s)
  $PY -m sparsek.cli build --arch sm90a --verbose >"$OUT/build.log" 2>&1
  rc=$?
  lib=$(ls "$SPARSEK_CACHE_DIR"/*sm90a/libsparsek.so 2>/dev/null | head -1)
  grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c | sort -rn | head -20 >"$OUT/resources.txt"
  if [ -n "$lib" ]; then
    cuobjdump --dump-sass "$lib" >"$OUT/sass.txt" 2>&1
    summary+=("build rc=$rc in $(( $(date +%s) - t0 ))s; SASS: HGMMA=$(grep -c HGMMA "$OUT/sass.txt") HMMA=$(grep -c HMMA "$OUT/sass.txt") LDL=$(grep -c 'LDL' "$OUT/sass.txt") STL=$(grep -c 'STL' "$OUT/sass.txt")")
  else
    summary+=("build FAILED rc=$rc (see build.log)")
    tail -30 "$OUT/build.log"
  fi
  grep -E "spill" "$OUT/build.log" | grep -v " 0 bytes spill stores, 0 bytes spill loads" | head
fi

if has tests; then
  $PY -m pytest ${TEST_PATHS:-packages} -m "gpu or sm90" -q -p no:cacheprovider --junitxml="$OUT/junit.xml" >"$OUT/pytest.log" 2>&1
  summary+=("gpu tests: $(tail -1 "$OUT/pytest.log")")
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -40
  # The dense tests again with cluster split-KV off (small grids: one CTA per query block, or split keys), forced to
  # 8 CTAs per query block (one key tile per CTA, many empty splits), and with every dense shape on the split-keys
  # kernel (two warpgroups on alternate key tiles of a 64-row block), the small grids without half rows (64 query
  # rows per CTA), and every dense shape on the half-rows split-keys kernel (32 rows per CTA). '+' joins two knobs.
  for knob in SPARSEK_SM90_SPLITS=1 SPARSEK_SM90_SPLITS=8 SPARSEK_SM90_SPLIT_KEYS=1 SPARSEK_SM90_HALF_ROWS=0 \
    SPARSEK_SM90_SPLIT_KEYS=1+SPARSEK_SM90_HALF_ROWS=1; do
    name=${knob//SPARSEK_SM90_/}
    log="$OUT/pytest_${name//[=+]/}.log"
    env ${knob//+/ } $PY -m pytest packages/sparsek-kernels/tests/test_attention_gpu.py -m "gpu or sm90" -q \
      -p no:cacheprovider >"$log" 2>&1
    summary+=("gpu tests, $knob: $(tail -1 "$log")")
    grep -E "^(FAILED|ERROR)" "$log" | head -20
  done
fi

if has bench-quick; then
  $PY tools/bench_attention.py --quick --out "$OUT" >"$OUT/bench.log" 2>&1 || tail -20 "$OUT/bench.log"
fi
if has bench; then
  $PY tools/bench_attention.py --out "$OUT" --rounds "${BENCH_ROUNDS:-3}" >"$OUT/bench.log" 2>&1 || tail -20 "$OUT/bench.log"
fi
if has extra; then
  mkdir -p "$OUT/sparse"
  timeout 300 $PY packages/sparsek-kernels/benchmarks/bench_sparse.py --out "$OUT/sparse" >"$OUT/bench_sparse.log" 2>&1
  summary+=("bench_sparse rc=$?")
  timeout 150 $PY packages/sparsek-kernels/benchmarks/bench_decode.py --out "$OUT/bench_decode.md" >"$OUT/bench_decode.log" 2>&1
  summary+=("bench_decode rc=$?")
  timeout 100 $PY packages/sparsek-xformers/benchmarks/bench_xformers.py --out "$OUT/bench_xformers.md" >"$OUT/bench_xformers.log" 2>&1
  summary+=("bench_xformers rc=$?")
fi

if has pdl; then
  for pdl in 1 0 1 0; do
    SPARSEK_PDL=$pdl timeout 200 $PY packages/sparsek-kernels/benchmarks/bench_pdl_ab.py >>"$OUT/bench_pdl.log" 2>&1
  done
  summary+=("pdl A/B (graph of 20 calls / of 1 call, us):")
  while IFS= read -r line; do summary+=("  $line"); done < <(grep "^PDL=" "$OUT/bench_pdl.log")
fi

echo "================ summary ================"
cat "$OUT/gpu.txt"
[ -f "$OUT/resources.txt" ] && cat "$OUT/resources.txt"
for s in "${summary[@]}"; do echo "$s"; done
[ -f "$OUT/bench_attention.md" ] && grep -E "sparsek|sdpa-cudnn" "$OUT/bench_attention.md" | cut -c1-110
exit 0
