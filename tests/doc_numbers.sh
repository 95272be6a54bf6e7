#!/bin/sh
# The demos' numbers in the docs are what the demos print (make doc-numbers,
# part of make test; ~10 s):
#  train-demo  README's max/mean loads and losses of the three runs are those
#              build/train_balance prints; examples/train_balance.svg is the
#              svg it writes.
#  vit-demo    (20 epochs, seed 1; built with -mavx2 -mfma where the CPU has
#              them, else the reference) the accuracy it prints is in README
#              and in the table of examples/vit_moe_digits.c's comment, on the
#              row of its kernels; the AVX2 run's svg is the committed one.
# Usage: tests/doc_numbers.sh BUILD_DIR   (needs BUILD_DIR/train_balance and
# BUILD_DIR/vit_docs, which the Makefile's doc-numbers target builds)
set -eu
cd "$(dirname "$0")/.."
build=${1:-build}
out=$build/doc_numbers
mkdir -p "$out"
status=0
fail() { echo "doc-numbers: $*"; status=1; }
# a README paragraph (from the line starting with $1 to a blank line), on one line
# (or to the next list item)
para() {
    awk -v p="$1" 'index($0, p) == 1 { s = 1; print; next } s && (/^$/ || /^- /) { exit } s' README.md |
        tr -s ' \n' '  '
}

"$build/train_balance" "$out" > "$out/train_balance.txt"
text=$(para "Without balancing")
for run in none aux bias; do
    for v in $(awk -v r=$run '$1 == r { print $3, $4 }' "$out/train_balance.txt"); do
        case $text in *"$v"*) ;; *) fail "README's train-demo paragraph lacks $run's $v" ;; esac
    done
done
cmp -s "$out/train_balance.svg" examples/train_balance.svg ||
    fail "examples/train_balance.svg is not what make train-demo writes (cp $out/train_balance.svg examples/)"

"$build/vit_docs" examples/data/digits.txt "$out" > "$out/vit_moe_digits.txt"
kernels=$(sed -n 's/.*, seed 1, \(.*\) kernels$/\1/p' "$out/vit_moe_digits.txt")
acc=$(sed -n 's/^final test accuracy \([0-9.]* %\) (\([0-9]* of [0-9]*\)).*/\1 (\2)/p' "$out/vit_moe_digits.txt")
case $kernels in
    "AVX2 + FMA") row='-mavx2 -mfma -fopenmp' ;;
    "scalar reference") row='none: the scalar reference' ;;
    *) row= ;;
esac
if [ -z "$acc" ] || [ -z "$row" ]; then
    fail "vit_docs printed no accuracy or ran unexpected kernels ('$kernels'): see $out/vit_moe_digits.txt"
else
    grep -F -e "$row" examples/vit_moe_digits.c | grep -qF -e "$acc" ||
        fail "examples/vit_moe_digits.c's table lacks '$acc' on the row '$row'"
    text=$(para "- \`examples/vit_moe_digits.c\`")
    case $text in *"${acc% (*}"*"(${acc#*(}"*) ;; *) fail "README's vit-demo item lacks $kernels's $acc" ;; esac
    if [ "$kernels" = "AVX2 + FMA" ]; then
        cmp -s "$out/vit_moe_digits.svg" examples/vit_moe_digits.svg ||
            fail "examples/vit_moe_digits.svg is not the AVX2 run's (cp $out/vit_moe_digits.svg examples/)"
    fi
fi
[ $status -ne 0 ] || echo "doc-numbers: train-demo and vit-demo ($kernels: $acc) print what the docs say"
exit $status
