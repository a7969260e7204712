#!/usr/bin/env bash
# Side-by-side decode-step timing of two commits, alternating runs, in one session:
#   scripts/ablate_commits.sh BEFORE AFTER [rounds]     e.g. scripts/ablate_commits.sh fab36e3 b752202 3
# Each config runs `rounds` times per commit (best kept by the reader); one JSON line per run. The timer
# is this checkout's `tinyserve_lab.decode_speed --per-step` (public API only) for both commits: $tmp/lab
# holds only this checkout's lab and comes first on the path, then the commit's src/ for its engine.
set -euo pipefail
cd "$(dirname "$0")/.."
before=$1; after=$2; rounds=${3:-3}
tmp=$(mktemp -d)
trap 'git worktree remove --force "$tmp/before"; git worktree remove --force "$tmp/after"; rm -rf "$tmp"' EXIT
git worktree add -q --detach "$tmp/before" "$before"
git worktree add -q --detach "$tmp/after" "$after"
mkdir "$tmp/lab" && ln -s "$PWD/src/tinyserve_lab" "$tmp/lab/tinyserve_lab"
for r in $(seq "$rounds"); do
  for cfg in "--dtype float32 --quantization none --batch 1" "--dtype bfloat16 --quantization gguf --batch 1 --packed-max-rows 16" \
             "--dtype bfloat16 --quantization gguf --batch 32 --packed-max-rows 16"; do
    for side in before after; do
      # shellcheck disable=SC2086
      echo "{\"commit\": \"$side\", \"round\": $r, \"run\": $(PYTHONPATH="$tmp/lab:$tmp/$side/src" .venv/bin/python -m tinyserve_lab.decode_speed --per-step $cfg 2>/dev/null)}"
    done
  done
done
