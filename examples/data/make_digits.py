#!/usr/bin/env python3
"""Convert scikit-learn's bundled copy of the UCI handwritten digits to the
plain-text file examples/vit_moe_digits.c reads (see README.md here).

    pip install scikit-learn        # the data ships inside the wheel: no download
    python3 examples/data/make_digits.py [output path]   # default: next to this script

Output: digits.txt, 1797 lines, one sample per line:
    label v0 v1 ... v63
label is the digit 0..9, v0..v63 the 8x8 image row by row (v[8*r + c]),
integer pixel counts 0..16. The rows are shuffled once with a fixed seed
(numpy RandomState(0), whose stream numpy keeps stable), so the split is the
file itself: lines 1..1437 are the training set, lines 1438..1797 the test set.
"""
import os
import sys

import numpy as np
from sklearn.datasets import load_digits

N_TRAIN = 1437  # the remaining 360 samples (20 %) are the test set
SEED = 0


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "digits.txt")
    digits = load_digits()
    x = digits.data.astype(np.int64)          # (1797, 64), values 0..16
    y = digits.target.astype(np.int64)        # (1797,), 0..9
    assert x.shape == (1797, 64) and x.min() >= 0 and x.max() <= 16
    assert (digits.data == x).all()           # the pixels are integers
    order = np.random.RandomState(SEED).permutation(len(y))
    with open(out, "w", newline="\n") as f:
        for i in order:
            f.write(" ".join([str(y[i])] + [str(v) for v in x[i]]) + "\n")
    train, test = y[order[:N_TRAIN]], y[order[N_TRAIN:]]
    print(f"wrote {out}: {len(y)} samples ({N_TRAIN} train, {len(test)} test)")
    print("train per class:", np.bincount(train, minlength=10).tolist())
    print("test per class: ", np.bincount(test, minlength=10).tolist())


if __name__ == "__main__":
    main()
