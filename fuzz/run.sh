#!/usr/bin/env bash
# Fuzz one target for a bounded time: fuzz/run.sh TARGET [SECONDS] [RUNS]. Stops at SECONDS
# (default 60) or after RUNS executions (default: no limit), whichever comes first; prints
# libFuzzer's summary (stat::number_of_executed_units is the execution count).
# Every target: for t in $(ls fuzz/fuzz_targets | sed 's/\.rs$//'); do fuzz/run.sh $t 1800 10000000; done
# FUZZ_SANITIZER=none builds without AddressSanitizer (cargo fuzz -s none): for targets whose
# code under test is safe Rust, where ASan finds nothing and costs most of the time.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: fuzz/run.sh TARGET [SECONDS] [RUNS]}
secs=${2:-60}
runs=${3:--1}
mkdir -p "fuzz/corpus/$target"
RUSTC_BOOTSTRAP=1 cargo fuzz run -s "${FUZZ_SANITIZER:-address}" --fuzz-dir fuzz "$target" \
  "fuzz/corpus/$target" -- \
  -max_total_time="$secs" -runs="$runs" -print_final_stats=1 -rss_limit_mb=2048
