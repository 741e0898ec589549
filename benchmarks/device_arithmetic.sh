#!/usr/bin/env bash
# Chapters 10 and 11 on the device, one call of under 10 minutes (one H100/H200): three small training runs that
# are bound by kernel launches, sharing the GPU: the longest simple_phi3 arithmetic run and two simple_mistral
# arithmetic recipes at batch 256. Each sizes its steps to a training budget measured on the device (a probe under
# contention is pessimistic), so all end inside the call.
#   run(command="bash benchmarks/device_arithmetic.sh", timeout_s=600)
# (The stored runs of 2026-12-01 came from this script when it also ran benchmarks/speculative.py first; that step
# was cut off by its timeout before printing anything and now lives in device_speculative_paged.sh.)
# Copy $OUT/*.json into results/ (chapter 11 loads the later scratchpad model, so the v3 weights are not kept).
set -u
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT="${OUT:-results}"
LOGS=$(mktemp -d)
M="python -m dldna.examples.mistral_tasks math --n-val 132 --save --out-dir $OUT --budget 270"
timeout 390 python -m dldna.experiments.arithmetic_lm --part final --budget-s 270 --tag _v3 --out-dir "$OUT" \
    > "$LOGS/phi3.log" 2>&1 &
timeout 390 $M --variant range99_reversed_b256_wd1 > "$LOGS/math_b256.log" 2>&1 &
timeout 390 $M --variant range99_reversed_wide_b256_wd1 > "$LOGS/math_wide.log" 2>&1 &
wait
for f in "$LOGS"/*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -v 'it/s' | tail -25; done | tee "$OUT/device_arithmetic.log"
