#!/usr/bin/env bash
# Runs each test of the deterministic simulation on N random seeds (default 20) and prints a
# summary per test: seeds passed and failed, faults, simulated and real time. Replay a failed
# seed with SIM_SEED=<seed> cargo test -p cellplane-tests --test sim <test>.
set -uo pipefail
cd "$(dirname "$0")/.."
n="${1:-20}"
status=0
# label=test, one per test of tests/sim/.
for entry in routes=routes::route_moves_and_linearizable_lookups_stay_linearizable_under_the_nemesis \
    routes-5=routes::the_route_history_stays_linearizable_on_five_nodes \
    messages=messages::acknowledged_messages_survive_migrations_under_the_nemesis \
    failover-sync=failover::failovers_lose_nothing_acknowledged_and_never_make_two_writers \
    failover-alone=failover::a_primary_that_goes_on_alone_loses_nothing_it_acknowledged \
    failover-async=failover::a_primary_with_an_asynchronous_standby_is_fenced_by_its_lease_alone; do
    label="${entry%%=*}"
    test="${entry#*=}"
    log="$(mktemp -t cellplane-soak.XXXXXX)"
    started=$(date +%s)
    SIM_SEEDS="$n" cargo test -q -p cellplane-tests --test sim "$test" -- --exact --nocapture \
        >"$log" 2>&1 || status=1
    elapsed=$(( $(date +%s) - started ))
    awk -v n="$n" -v elapsed="$elapsed" -v test="$label" '
        /^seed [0-9]+: .* s simulated in / {
            passed++
            if (match($0, /[0-9]+ faults/)) faults += substr($0, RSTART, RLENGTH) + 0
            if (match($0, /[0-9.]+ s simulated in [0-9.]+ s/)) {
                split(substr($0, RSTART, RLENGTH), t, " ")
                sim += t[1]; real += t[5]
            }
        }
        /replay with SIM_SEED=/ { sub(/.*SIM_SEED=/, ""); failed = failed " " $0 }
        END {
            printf "%s: %d seeds, %d passed, %d failed%s\n", test, n, passed, n - passed,
                (failed == "" ? "" : " (seeds" failed ")")
            if (passed > 0)
                printf "  %d faults, %.0f s simulated in %.0f s of runs (%.1fx); %d s in all, %.2f seeds/s\n",
                    faults, sim, real, sim / real, elapsed, n / elapsed
        }' "$log"
    echo "  full output: $log"
done
exit "$status"
