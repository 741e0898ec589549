#!/usr/bin/env bash
# Chapter 10 full-size runs for simple Mistral, on the device (one H100; about 3.5 device-minutes with the start):
#   WikiSQL logical forms (train on the local test split, evaluate on all 8,421 dev questions), 3,000 steps,
#   and two-operand arithmetic (6,000 steps, 132 held-out expressions), both on the GPU at the same time.
# Before the call, on this machine (the device does not see ../shared):
#   mkdir -p .devdata && cp -r ../shared/data/wikisql ../shared/data/tokenizers .devdata/
#   echo /.devdata/ >> .git/info/exclude
# Then: run(command="bash benchmarks/mistral_tasks_device.sh", carry=[".devdata"], timeout_s=300)
# and copy $OUT/mistral_wikisql.json and $OUT/mistral_arithmetic_base.json into results/.
set -u
export DLDNA_DATA_DIR="$PWD/.devdata" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT="${OUT:-results}"
M="python -m dldna.examples.mistral_tasks"
timeout 280 $M sql --save --out-dir "$OUT" --steps 3000 > "$OUT/sql.log" 2>&1 &
timeout 280 $M math --variant base --save --out-dir "$OUT" > "$OUT/math.log" 2>&1 &
wait
cat "$OUT/sql.log" "$OUT/math.log" | tr '\r' '\n' | grep -v 'it/s'
