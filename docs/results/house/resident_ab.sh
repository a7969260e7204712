#!/usr/bin/env bash
# Served c=1 before and after, both servers resident (started once, idle while the other is measured),
# runs in ABBA order so that drift cancels: 8 x 128 in / 128 out per run.
#   OUT=dir docs/results/house/resident_ab.sh "OLD_TINYSERVE" "NEW_TINYSERVE" [pairs]
set -euo pipefail
old=$1; new=$2; pairs=${3:-3}
out=${OUT:-$(dirname "$0")}; client="$new bench serve"
$old serve --port 8201 > /tmp/resident-old.log 2>&1 & p1=$!
$new serve --port 8202 > /tmp/resident-new.log 2>&1 & p2=$!
trap 'kill -TERM $p1 $p2; wait' EXIT
for port in 8201 8202; do until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do sleep 0.5; done; done
run() {  # side port index
  $client --base-url "http://127.0.0.1:$2/v1" --dataset random --random-input-len 128 --random-output-len 128 \
    --num-prompts 8 --max-concurrency 1 --ignore-eos --disable-tqdm --label "$1-$3-c1" --result-dir "$out" > /dev/null
}
for i in $(seq "$pairs"); do
  run old 8201 "${i}a"; run new 8202 "${i}a"; run new 8202 "${i}b"; run old 8201 "${i}b"
done
