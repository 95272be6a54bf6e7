#!/usr/bin/env bash
# Runs each test binary given on the command line (from tests/, where the
# golden files are), prints each one's summary, and ends with the total as
# one line "N passed, N failed" (the form CI reads). Exit 1 if any test
# failed or a binary did not finish with a summary line.
set -u
cd "$(dirname "$0")"
total_pass=0; total_fail=0; status=0
for cmd in "$@"; do
    out=$(eval "$cmd" 2>&1); rc=$?
    last=$(printf '%s\n' "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed' | tail -n 1)
    if [ -z "$last" ]; then
        printf '%s\n' "$out" | tail -n 20
        echo "[$cmd] crashed or printed no summary (exit $rc)"
        total_fail=$((total_fail + 1)); status=1; continue
    fi
    printf '%s\n' "$out" | grep -vE '^[0-9]+ passed, [0-9]+ failed' | grep -E 'FAIL|skip|:[0-9]+: ' || true
    echo "[$cmd] $last"
    p=$(echo "$last" | sed -E 's/^([0-9]+) passed.*/\1/')
    f=$(echo "$last" | sed -E 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/')
    total_pass=$((total_pass + p)); total_fail=$((total_fail + f))
    [ "$rc" -eq 0 ] || status=1
done
echo "$total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ] || status=1
exit $status
