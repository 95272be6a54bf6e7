#!/bin/sh
# The documentation's code compiles as written (make doc-snippets, part of
# make test): the first ```c block under README.md's "## Use it", and the
# EXAMPLE in moe.h's top comment, each with cc -std=c99 -Wall -Wextra -Werror
# -pedantic -c. The EXAMPLE is a function body (its lines indented 5 spaces):
# its #include lines go on top, the rest into a function whose parameters are
# the names it uses: x, T, y and the weights router, gate, up, down.
# Usage: tests/doc_snippets.sh [build dir]   (CC picks the compiler)
set -eu
cd "$(dirname "$0")/.."
out=${1:-build}/doc_snippets
mkdir -p "$out"
cc=${CC:-cc}

awk '/^## Use it/ { s = 1; next }
     s == 1 && /^```c$/ { s = 2; next }
     s == 2 && /^```$/ { exit }
     s == 2' README.md > "$out/readme_use_it.c"

awk '/^   EXAMPLE/ { s = 1; next }
     s && !/^     / { exit }
     s { sub(/^     /, ""); if (/^#/) print; else body = body "    " $0 "\n" }
     END { print "void doc_example(const float *x, int T, float *y, const float *router,"
           print "                 const float *gate, const float *up, const float *down) {"
           printf "%s}\n", body }' moe.h > "$out/banner_example.c"

status=0
for f in readme_use_it banner_example; do
    if ! grep -q 'moe_forward' "$out/$f.c"; then
        echo "doc-snippets: $f: snippet not found (README.md \"## Use it\" / moe.h EXAMPLE)"
        status=1
    elif $cc -std=c99 -Wall -Wextra -Werror -pedantic -I. -c "$out/$f.c" -o "$out/$f.o"; then
        echo "doc-snippets: $f compiles ($out/$f.c)"
    else
        echo "doc-snippets: $f does not compile as written: $out/$f.c"
        status=1
    fi
done
exit $status
