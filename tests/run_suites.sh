#!/usr/bin/env bash
# Runs each test binary given on the command line (from tests/, where the
# golden files are), streams its per-suite lines ("suite NAME: N passed, ...")
# and any FAIL / skip / file:line lines as they come, prints each binary's
# summary, and ends with the total as one line "N passed, N failed" (the form
# CI reads). Exit 1 if any test failed or a binary did not finish with a
# summary line.
# RUN_SUITES_JOBS=N runs up to N binaries at once (their lines then come
# when each is done, in command-line order).
set -u
cd "$(dirname "$0")"
total_pass=0; total_fail=0; status=0
jobs=${RUN_SUITES_JOBS:-1}
dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT
filter() {   # the lines worth showing of a binary's output
    while IFS= read -r line; do
        if [[ $line == "suite "* ]]; then printf '  %s\n' "$line"
        elif [[ $line =~ ^[0-9]+\ passed,\ [0-9]+\ failed ]]; then :
        elif [[ $line =~ FAIL|skip|:[0-9]+:\  ]]; then printf '%s\n' "$line"; fi
    done
}
if [ "$jobs" -gt 1 ]; then
    i=0; running=0
    for cmd in "$@"; do
        if [ "$running" -ge "$jobs" ]; then wait -n; running=$((running - 1)); fi
        (eval "$cmd" > "$dir/$i.log" 2>&1; echo $? > "$dir/$i.rc") &
        i=$((i + 1)); running=$((running + 1))
    done
    wait
fi
i=0
for cmd in "$@"; do
    log=$dir/$i.log
    if [ "$jobs" -gt 1 ]; then
        filter < "$log"
        rc=$(cat "$dir/$i.rc")
    else
        eval "$cmd" 2>&1 | tee "$log" | filter
        rc=${PIPESTATUS[0]}
    fi
    i=$((i + 1))
    last=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
    if [ -z "$last" ]; then
        tail -n 20 "$log"
        echo "[$cmd] crashed or printed no summary (exit $rc)"
        total_fail=$((total_fail + 1)); status=1; continue
    fi
    echo "[$cmd] $last"
    p=$(echo "$last" | sed -E 's/^([0-9]+) passed.*/\1/')
    f=$(echo "$last" | sed -E 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/')
    total_pass=$((total_pass + p)); total_fail=$((total_fail + f))
    [ "$rc" -eq 0 ] || status=1
done
echo "$total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ] || status=1
exit $status
