#!/usr/bin/env bash
# Served throughput of two trees, interleaved: each tree's server started the same way (defaults: bf16 +
# the GGUF's own blocks), measured only once its compiled decode step serves (a tree that compiles
# before /health answers, or one whose /health says "compiled_step": "ready"), then c=1 (8 x 128 in /
# 128 out) and c=32 (64 x 256 in / 128 out) from the same load generator; rounds alternate old, new.
#   OUT=RESULT_DIR scripts/serve_ab.sh "OLD_TINYSERVE" "NEW_TINYSERVE" [rounds]
# e.g. "env PYTHONPATH=/path/to/old/src .venv/bin/tinyserve" ".venv/bin/tinyserve": the second one's lab
# is the load generator for both. Used for docs/results/house and docs/results/startup/serve.
set -euo pipefail
old=$1; new=$2; rounds=${3:-2}
out=${OUT:?set OUT to the result directory}; client="$new bench serve"
mkdir -p "$out"
for r in $(seq "$rounds"); do
  for side in old new; do
    port=$((8100 + 2 * r)); [ "$side" = new ] && port=$((port + 1))
    ${!side} serve --port "$port" > "/tmp/serve-ab-$side-$r.log" 2>&1 &
    pid=$!
    start=$(date +%s.%N)
    until curl -sf "http://127.0.0.1:$port/health" | grep -qv '"building"'; do sleep 0.5; done
    echo "{\"side\": \"$side\", \"round\": $r, \"full_speed_s\": $(echo "$(date +%s.%N) - $start" | bc)}" >> "$out/ready.jsonl"
    $client --base-url "http://127.0.0.1:$port/v1" --dataset random --random-input-len 128 --random-output-len 128 \
      --num-prompts 8 --max-concurrency 1 --ignore-eos --disable-tqdm --label "$side-r$r-c1" --result-dir "$out"
    $client --base-url "http://127.0.0.1:$port/v1" --dataset random --random-input-len 256 --random-output-len 128 \
      --num-prompts 64 --max-concurrency 32 --ignore-eos --disable-tqdm --label "$side-r$r-c32" --result-dir "$out"
    kill -TERM "$pid"; wait "$pid" || true
  done
done
