#!/usr/bin/env bash
# Chapters 8 and 10 on the device, one call of under 10 minutes (one H100/H200), two jobs sharing the GPU:
#   the four AG News encoder configurations (v1/v2 x bert/t5, masked-LM warm start, ensemble, gradient
#   checkpointing) and simple_mistral on WikiSQL logical forms (steps sized to a 200 s training budget).
# The device does not see ../shared; before the call, on this machine:
#   mkdir -p .devdata && cp -r ../shared/data/ag_news ../shared/data/wikisql ../shared/data/tokenizers .devdata/
#   echo /.devdata/ >> .git/info/exclude
#   run(command="bash benchmarks/device_encoder_wikisql.sh", carry=[".devdata"], timeout_s=600)
# Copy $OUT/encoder_agnews.json and $OUT/mistral_wikisql.json into results/.
set -u
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 DLDNA_DATA_DIR="$PWD/.devdata"
OUT="${OUT:-results}"
LOGS=$(mktemp -d)
timeout 540 python -m dldna.models.encoder_experiments --no-baseline --mlm-steps 1500 --out "$OUT" \
    > "$LOGS/encoder.log" 2>&1 &
timeout 330 python -m dldna.examples.mistral_tasks sql --save --out-dir "$OUT" --budget 200 > "$LOGS/sql.log" 2>&1 &
wait
for f in "$LOGS"/*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -v 'it/s' | tail -30; done | tee "$OUT/device_encoder_wikisql.log"
