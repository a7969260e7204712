#!/usr/bin/env bash
# The house refactor's served A/B: scripts/serve_ab.sh with its results here (see README.md).
OUT=${OUT:-$(dirname "$0")} exec "$(dirname "$0")/../../../scripts/serve_ab.sh" "$@"
