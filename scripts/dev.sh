#!/usr/bin/env bash
# Builds cellplane (release) and runs the whole system on this machine until Ctrl-C: a 3-node
# control plane on embedded storage and an agent per region running IM cells of every tier.
# Arguments go to `cellplane dev` (e.g. --demo, --data-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/ensure-tools.sh protoc
cargo build --release --workspace --bins --locked
exec target/release/cellplane dev "$@"
