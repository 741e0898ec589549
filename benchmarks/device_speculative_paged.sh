#!/usr/bin/env bash
# Chapters 6 and 13 on the device, one call of under 10 minutes (one H100/H200), each job with the GPU to itself:
#   speculative vs plain greedy decoding tokens/s (benchmarks/speculative.py; its training of target and draft runs
#   in fp32 with batches sampled on the CPU, minutes rather than seconds), then the paged decode kernel's bandwidth
#   against SDPA and a device copy (benchmarks/paged_decode.py).
#   run(command="bash benchmarks/device_speculative_paged.sh", timeout_s=560)
# Copy $OUT/speculative_gpu.json and $OUT/paged_decode.json into results/.
set -u
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-results}"
LOGS=$(mktemp -d)
timeout 360 python benchmarks/speculative.py --out-dir "$OUT" --repeats 2 > "$LOGS/speculative.log" 2>&1
echo "speculative exit $?" >> "$LOGS/speculative.log"
timeout 170 python benchmarks/paged_decode.py --out-dir "$OUT" > "$LOGS/paged.log" 2>&1
echo "paged exit $?" >> "$LOGS/paged.log"
# progress bars stay in the logs (where a job is cut off they show how far it got); the last few lines of each
for f in "$LOGS"/*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -v '^ *$' | tail -22; done | tee "$OUT/device_speculative_paged.log"
