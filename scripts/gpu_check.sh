#!/usr/bin/env bash
# The one-shot GPU check (scripts/gpu_check.py says what it measures):
#   bash scripts/gpu_check.sh --out benchmarks/gpu.json [--wheels DIR]
#   bash scripts/gpu_check.sh --dry-run --out /tmp/gpu.json    # CPU, tiny, seconds
# --wheels DIR: install the project (and what its extras need that the machine
# lacks) from wheels carried in DIR, without an index; otherwise it must be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels)
            python3 -m pip install -q --no-index --find-links "$2" -e ".[dev]"
            shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
exec python3 scripts/gpu_check.py "${args[@]}"
