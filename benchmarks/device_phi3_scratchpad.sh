#!/usr/bin/env bash
# Chapter 11 on the device, one call of under 8 minutes (one H100/H200): the final simple_phi3 recipe with a
# scratchpad target (the first operation's value, "=", then the answer), at the same 9,371 steps, batch and seed
# as the stored run without it (phi3_arithmetic_final_v3), so the two differ in the target format alone.
#   run(command="bash benchmarks/device_phi3_scratchpad.sh", timeout_s=480)
# Copy $OUT/phi3_arithmetic_final_v4.json and $OUT/phi3_arithmetic_model_v4.pt into results/.
set -u
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT="${OUT:-results}"
timeout 440 python -m dldna.experiments.arithmetic_lm --part final --steps 9371 --scratchpad --tag _v4 \
    --out-dir "$OUT" 2>&1 | tee "$OUT/device_phi3_scratchpad.log"
