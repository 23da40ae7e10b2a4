#!/usr/bin/env bash
# Runs editguard's fuzz targets (see README.md, "Fuzzing the readers").
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]      default: 300 seconds each, every target
# Needs cargo-fuzz (`cargo install cargo-fuzz`); builds on the stable toolchain through RUSTC_BOOTSTRAP=1, without a
# sanitizer (the readers are safe Rust; debug assertions catch overflow). Each target starts from its kept corpus
# (fuzz/corpus/<target>) and grows it; a crash is written to fuzz/artifacts/<target>/ — fix it, then move the input
# to fuzz/regressions/<target>/, where `cargo test` replays it. Limits: 2 GiB resident memory, 10 s per input.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-300}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(suite registry gguf datasets corpus)
RUSTC_BOOTSTRAP=1 cargo fuzz build -s none
for target in "${targets[@]}"; do
    case "$target" in
        gguf) max_len=16384 ;;
        registry | suite) max_len=32768 ;;
        *) max_len=8192 ;;
    esac
    mkdir -p "corpus/$target" "artifacts/$target"
    echo "== $target: ${seconds}s"
    "target/x86_64-unknown-linux-gnu/release/$target" "corpus/$target" -max_total_time="$seconds" \
        -max_len="$max_len" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 \
        -artifact_prefix="artifacts/$target/" -print_final_stats=1 2>&1 | grep -E "^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::number_of_executed_units|^stat::new_units_added|^Done|crash|panicked|ERROR" || true
done
