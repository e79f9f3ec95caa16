#!/usr/bin/env bash
# Runs every fuzz target for a while and fails if any of them crashes.
#
#   fuzz/run.sh [SECONDS_PER_TARGET]     (default 20; CI's short run)
#   fuzz/run.sh 3600                     (a long run, one hour per target)
#   FUZZ_TARGETS="ticket payload" fuzz/run.sh 60   (only these targets)
#   FUZZ_SANITIZER=none fuzz/run.sh 20   (no AddressSanitizer: builds in about
#                                         half the time; CI's choice, since a
#                                         panic is what safe Rust can hit)
#
# Installs cargo-fuzz when it is missing. cargo-fuzz needs nightly compiler
# flags (sanitizers, coverage passes); on a stable toolchain they are
# enabled with RUSTC_BOOTSTRAP=1. Each target starts from its corpus in
# fuzz/corpus/<target>/ (kept between runs, not in git), which it seeds
# itself with valid inputs (see fuzz/src/seeds.rs), and from the saved
# crashes in fuzz/regressions/<target>/. A crashing input is written to
# fuzz/artifacts/<target>/; the script prints where, and how to replay it.
set -euo pipefail

seconds="${1:-20}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: fuzz/run.sh [SECONDS_PER_TARGET]   (a whole number of seconds, default 20)" >&2
    exit 2
fi

fuzz_dir="$(cd "$(dirname "$0")" && pwd)"
cd "$fuzz_dir/.."

# The cargo-fuzz this script was written against; any installed version is used as it is.
cargo_fuzz_version="0.13.2"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz $cargo_fuzz_version"
    cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
fi

if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

# The fuzz crate is its own workspace with its own lock file; a stale lock
# fails here rather than being rewritten silently.
cargo metadata --locked --format-version 1 --manifest-path "$fuzz_dir/Cargo.toml" >/dev/null

targets="${FUZZ_TARGETS:-$(cargo fuzz list --fuzz-dir "$fuzz_dir")}"

sanitizer="${FUZZ_SANITIZER:-address}"
echo "== building the fuzz targets ($(rustc --version), sanitizer: $sanitizer)"
cargo fuzz build --fuzz-dir "$fuzz_dir" --sanitizer "$sanitizer"

# libFuzzer stops by itself after max_total_time; the outer timeout only
# bounds a run that hangs before or after it (start-up, the seeds, exit).
limit=$((seconds + 300))
failed=()
summary=()
for target in $targets; do
    corpus="$fuzz_dir/corpus/$target"
    artifacts="$fuzz_dir/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    log="$artifacts/fuzz.log"
    echo "== $target: ${seconds}s"
    status=0
    PROTONODE_FUZZ_SEED_DIR="$corpus" timeout --kill-after=30 "$limit" \
        cargo fuzz run --fuzz-dir "$fuzz_dir" --sanitizer "$sanitizer" "$target" "$corpus" "$fuzz_dir/regressions/$target" -- \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    runs="$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 runs in \2 s/p' "$log" | tail -n 1)"
    corpus_size="$(find "$corpus" -type f | wc -l)"
    if [ "$status" -eq 0 ]; then
        summary+=("$target: ${runs:-no run count}, corpus $corpus_size inputs")
        echo "   ok: ${runs:-no run count}"
        continue
    fi
    failed+=("$target")
    summary+=("$target: FAILED (exit $status)")
    echo "   FAILED (exit $status); the end of its log ($log):"
    tail -n 60 "$log" | sed 's/^/   | /'
    crash="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
    if [ -n "$crash" ]; then
        echo "   crashing input: $crash"
        echo "   replay it:      cargo fuzz run --fuzz-dir fuzz $target $crash"
        echo "   keep it:        cp $crash fuzz/regressions/$target/   (then fix the code; cargo test replays it)"
    elif grep -q "failed to build fuzz script" "$log"; then
        echo "   the target did not build (see above)"
    elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        echo "   the run did not end within ${limit}s"
    fi
done

echo "== summary (${seconds}s per target)"
printf '   %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzzing found problems in: ${failed[*]}" >&2
    exit 1
fi
