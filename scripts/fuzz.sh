#!/usr/bin/env bash
# Runs every cargo fuzz target (fuzz/fuzz_targets/) for a bounded time each: the request
# validators and converters, the Raft codec, the snapshot reader, the audit log's request
# text and the cell's record decoders. A crash stops the run with its input saved under
# fuzz/artifacts/<target>/; replay it with `cargo +nightly fuzz run <target> <file>`.
#
#   ./scripts/fuzz.sh                  # every target, 30 s each
#   ./scripts/fuzz.sh 300 raft_codec   # one target, 5 minutes
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-30}"
shift || true

# The fuzz crate builds the control plane and the cell, whose etcd-client runs protoc.
./scripts/ensure-tools.sh protoc
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "cargo fuzz needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi

targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build -O
for target in "${targets[@]}"; do
    echo "fuzz: $target for ${seconds}s" >&2
    # Only libFuzzer's summary is shown; with pipefail the fuzzer's own status decides.
    if ! cargo +nightly fuzz run -O "$target" -- -max_total_time="$seconds" -print_final_stats=1 2>&1 \
        | grep -E '^(Done|stat::number_of_executed_units)|panicked|ERROR|SUMMARY|Test unit written'; then
        echo "fuzz: $target crashed; its input is under fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
