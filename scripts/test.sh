#!/usr/bin/env bash
# Runs the whole cellplane test suite on a fresh machine: builds the binaries the process-level
# tests start, then runs every unit, integration and cluster test.
#
#   ./scripts/test.sh            # everything
#   ./scripts/test.sh cluster    # only tests whose name matches "cluster"
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is required (https://rustup.rs)" >&2
    exit 1
fi

# etcd-client's build runs protoc; the route-store tests start real etcd servers; the
# reflection tests run a real grpcurl; the Kubernetes tests start a real API server and run
# helm, kubectl and the Kubernetes schemas over the chart.
./scripts/ensure-tools.sh protoc etcd grpcurl kube-apiserver helm kubernetes-validate
if [ -z "${GRPCURL_BIN:-}" ]; then
    GRPCURL_BIN="$(command -v grpcurl || echo "$PWD/target/tools/grpcurl")"
    export GRPCURL_BIN
fi

# Cluster tests start real `cellplane serve` processes from the target directory.
cargo build --workspace --bins --locked

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast "$@"
else
    cargo test --workspace --locked --no-fail-fast "$@"
fi
