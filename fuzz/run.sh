#!/usr/bin/env bash
# Fuzz one target for a bounded time: fuzz/run.sh TARGET [SECONDS]. Prints libFuzzer's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: fuzz/run.sh TARGET [SECONDS]}
secs=${2:-60}
mkdir -p "fuzz/corpus/$target"
RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" -- \
  -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048
