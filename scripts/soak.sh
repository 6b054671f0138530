#!/usr/bin/env bash
# Runs the deterministic simulation on N random seeds (default 20) and prints a summary:
# seeds passed and failed, operations and faults, simulated and real time. Replay a failed
# seed with SIM_SEED=<seed> cargo test -p cellplane-tests --test sim.
set -uo pipefail
cd "$(dirname "$0")/.."
n="${1:-20}"
log="$(mktemp -t cellplane-soak.XXXXXX)"
started=$(date +%s)
SIM_SEEDS="$n" cargo test -q -p cellplane-tests --test sim \
    routes::route_moves_and_linearizable_lookups_stay_linearizable_under_the_nemesis \
    -- --exact --nocapture >"$log" 2>&1
elapsed=$(( $(date +%s) - started ))
awk -v n="$n" -v elapsed="$elapsed" '
    /^seed [0-9]+: [0-9]+ operations/ {
        passed++; ops += $3; faults += $5; sim += $7; real += $11
    }
    /replay with SIM_SEED=/ { sub(/.*SIM_SEED=/, ""); failed = failed " " $0 }
    END {
        printf "%d seeds: %d passed, %d failed%s\n", n, passed, n - passed,
            (failed == "" ? "" : " (seeds" failed ")")
        if (passed > 0)
            printf "%d operations, %d faults, %.0f s simulated in %.0f s of runs (%.1fx); %d s in all, %.2f seeds/s\n",
                ops, faults, sim, real, sim / real, elapsed, n / elapsed
    }' "$log"
echo "full output: $log"
grep -q "replay with SIM_SEED=" "$log" && exit 1 || exit 0
