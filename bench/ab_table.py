#!/usr/bin/env python3
"""Summarise bench/ab_bench.sh output: per (shape, T, variant) the median over rounds of each
round's median ms, [min-max of those], before and after, and before / after.
usage: bench/ab_table.py FILE [LABEL]   (LABEL: a first column, e.g. the build's ISA)"""
import collections
import statistics
import sys


def main():
    rows = collections.defaultdict(list)
    order = []
    with open(sys.argv[1]) as f:
        for line in f:
            p = line.split()
            if len(p) < 7 or p[1] not in ("before", "after"):
                continue
            key = (p[2], int(p[3]), p[4])      # shape, T, variant
            if key not in order:
                order.append(key)
            rows[key + (p[1],)].append(float(p[5]))
    label = sys.argv[2] if len(sys.argv) > 2 else None

    def cell(v):
        return f"{statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}]"

    head = ("| " + ("build | " if label else "") +
            "shape | T | variant | before | after | before / after |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for key in sorted(order, key=lambda k: (k[2], k[1], order.index(k))):
        b, a = rows[key + ("before",)], rows[key + ("after",)]
        if not b or not a:
            continue
        first = f"| {label} " if label else ""
        print(f"{first}| {key[0]} | {key[1]} | {key[2]} | {cell(b)} | {cell(a)} | "
              f"{statistics.median(b) / statistics.median(a):.2f}x |")


if __name__ == "__main__":
    main()
