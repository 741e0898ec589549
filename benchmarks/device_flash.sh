#!/usr/bin/env bash
# Chapter 5 on the device, one call of under 10 minutes (one H100/H200; the stored run, three rounds per row, took
#   303 s on an H200):
#   the GPU correctness matrix (benchmarks/gpu_test_flash.py) runs while benchmarks/attention.py pre-compiles,
#   then the attention benchmark times every row with the GPU to itself (it waits for the .go file).
#   run(command="bash benchmarks/device_flash.sh", timeout_s=600)
# Copy $OUT/flash_attention_bench.json and $OUT/flash_attention_gpu_test.json into results/.
set -u
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-results}"
python benchmarks/attention.py --out-dir "$OUT" --compile-workers 8 --compile-budget-s 200 --budget-s 540 \
    --wait-file "$OUT/.go" > "$OUT/bench.log" 2>&1 &
bench=$!
timeout 195 python benchmarks/gpu_test_flash.py --jobs 6 --out "$OUT/gpu_test.jsonl" --out-dir "$OUT" \
    > "$OUT/gpu_test.log" 2>&1 \
  || timeout 60 python benchmarks/gpu_test_flash.py --jobs 2 --only sparse --out "$OUT/gpu_test.jsonl" \
    --out-dir "$OUT" >> "$OUT/gpu_test.log" 2>&1
touch "$OUT/.go"
wait $bench
tail -25 "$OUT/gpu_test.log"
grep -v '^\[compile\]' "$OUT/bench.log" | tail -120
