#!/usr/bin/env bash
# make runner-check (part of make test): the suite's output streams.
#  1. The runner (tests/test_main.c) prints "suite NAME: N passed, N failed
#     (T s)" per suite, flushed as the suite ends: the misuse line must come
#     through a pipe while the binary still runs the vit suite (seconds; it is
#     then stopped), and the last line must be the total "N passed, N failed".
#     Only the format is checked: failures are the test run's to report.
#  2. tests/run_suites.sh passes suite lines on as they come: a stub binary
#     prints one, then waits up to 5 s until this script has seen it, and
#     prints a passing total only if it did.
# Usage: tests/check_runner.sh [test binary, relative to tests/]
set -u
cd "$(dirname "$0")"
if [ "${1:-}" = --stub ]; then
    echo "suite stub: 1 passed, 0 failed (0.0 s)"
    for _ in $(seq 50); do [ -e "$2" ] && { echo "1 passed, 0 failed"; exit 0; }; sleep 0.1; done
    echo "0 passed, 1 failed"; exit 1
fi
bin=${1:-../build/moe_tests}
status=0

exec 3< <(exec "$bin" misuse,vit.)
pid=$!
# a failing test's lines come first: skip them (the test run itself reports them)
first=
while IFS= read -r first <&3 && [[ $first != suite\ * ]]; do :; done
if [[ $first =~ ^suite\ misuse:\ [0-9]+\ passed,\ [0-9]+\ failed\ \([0-9]+\.[0-9]\ s\)$ ]] &&
   kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    last=$("$bin" misuse | tail -n 1)
    if [[ $last =~ ^[0-9]+\ passed,\ [0-9]+\ failed$ ]]; then echo "runner-check: $bin streams its suite lines"
    else echo "runner-check: $bin misuse: last line '$last', want 'N passed, N failed'"; status=1; fi
else
    echo "runner-check: $bin misuse,vit.: first line '$first' not a suite line seen while it ran"
    kill "$pid" 2>/dev/null; status=1
fi
exec 3<&-

marker=$(mktemp -u); trap 'rm -f "$marker"' EXIT
last=$(./run_suites.sh "./check_runner.sh --stub $marker" | while IFS= read -r line; do
    [[ $line == *"suite stub:"* ]] && touch "$marker"; printf '%s\n' "$line"; done | tail -n 1)
if [ "$last" = "1 passed, 0 failed" ]; then echo "runner-check: run_suites.sh streams suite lines"
else echo "runner-check: run_suites.sh did not pass the stub's suite line on while it ran"; status=1; fi
exit $status
