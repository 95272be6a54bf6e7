#!/usr/bin/env python3
"""Table of bench/quant_bench.sh's raw outputs: python3 bench/quant_table.py DIR ROUNDS.

For each type, rows (shape, T) and columns ggml, moe.h v3 (blocks), v3 built with VNNI,
v2 (blob from the blocks), then with the decode layout (moe_qpack_weights): v3 and v2, and
v3 and v2 built with VNNI, then fp32 v2: the median over rounds of each round's median ms,
[min-max of those round medians]; then ggml / best moe.h and fp32 / best moe.h (x > 1:
moe.h faster), each from the medians. "FAIL" marks a ggml row whose own check failed."""
import os
import re
import statistics
import sys

MOE = re.compile(r"^(\S+-mini)\s+(\d+)\s+(\d)\s+([\d.]+)\s")
GGML = re.compile(r"^(\S+-mini)\s+(\d+)\s+(q8_0|q4_0|q4_k|mxfp4)\s+(\S+)\s+([\d.]+)\s.*\s(ok|FAIL)$")


def read(path, pat):
    rows = {}
    if not os.path.exists(path):
        return rows
    for line in open(path):
        m = pat.match(line.rstrip())
        if m:
            rows[m.groups()[:-1] if pat is GGML else m.groups()[:3]] = m.groups()
    return rows


def main():
    d, rounds = sys.argv[1], int(sys.argv[2])
    data = {}                        # (kind, type, shape, T) -> [ms per round]
    fails = set()
    for r in range(1, rounds + 1):
        for (shape, T, v), g in read(os.path.join(d, "r%d_fp32.txt" % r), MOE).items():
            data.setdefault(("fp32 v2", "", shape, int(T)), []).append(float(g[3]))
        for q in ("q8_0", "q4_0", "q4_k", "mxfp4"):
            for (shape, T, v), g in read(os.path.join(d, "r%d_%s.txt" % (r, q)), MOE).items():
                data.setdefault(("v" + v, q, shape, int(T)), []).append(float(g[3]))
            for (shape, T, v), g in read(os.path.join(d, "r%d_%s_vnni.txt" % (r, q)),
                                         MOE).items():
                data.setdefault(("v3 vnni", q, shape, int(T)), []).append(float(g[3]))
            for suffix, tag in (("qp", " qp"), ("qp_vnni", " qp vnni")):
                for (shape, T, v), g in read(os.path.join(d, "r%d_%s_%s.txt" % (r, q, suffix)),
                                             MOE).items():
                    data.setdefault(("v" + v + tag, q, shape, int(T)), []).append(float(g[3]))
        for key, g in read(os.path.join(d, "r%d_ggml.txt" % r), GGML).items():
            shape, T, q = g[0], int(g[1]), g[2]
            data.setdefault(("ggml", q, shape, T), []).append(float(g[4]))
            if g[5] != "ok":
                fails.add((q, shape, T))

    def cell(kind, q, shape, T):
        v = data.get((kind, q, shape, T))
        if not v:
            return None, "-"
        m = statistics.median(v)
        return m, "%.2f [%.2f-%.2f]" % (m, min(v), max(v))

    shapes = ("mixtral-mini", "deepseek-mini", "qwen-mini")
    Ts = sorted({k[3] for k in data})
    for q in ("q8_0", "q4_0", "q4_k", "mxfp4"):
        print("\n#### %s\n" % q.upper())
        print("| shape | T | ggml | moe.h v3 blocks | v3 + VNNI | v2 blob + blocks |"
              " v3 qpack | v2 qpack | v3 qpack + VNNI | v2 qpack + VNNI | fp32 v2 |"
              " ggml / best | fp32 / best |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for shape in shapes:
            for T in Ts:
                g, gs = cell("ggml", q, shape, T)
                if g is None and not data.get(("v3", q, shape, T)):
                    continue
                ours = [cell(k, q, shape, T) for k in ("v3", "v3 vnni", "v2", "v3 qp", "v2 qp",
                                                       "v3 qp vnni", "v2 qp vnni")]
                f, fs = cell("fp32 v2", "", shape, T)
                best = min((m for m, _ in ours if m is not None), default=None)
                r1 = "%.2fx" % (g / best) if g and best else "-"
                r2 = "%.2fx" % (f / best) if f and best else "-"
                mark = " FAIL" if (q, shape, T) in fails else ""
                print("| %s | %d | %s%s | %s | %s | %s | %s |" % (
                    shape, T, gs, mark, " | ".join(o[1] for o in ours), fs, r1, r2))


if __name__ == "__main__":
    main()
