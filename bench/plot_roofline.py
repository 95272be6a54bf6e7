"""bench/plot_roofline.py -- roofline-style SVG of a bench/run_bench.sh JSON file.

run: python3 bench/plot_roofline.py [build/bench.json] [build/roofline.svg]   (make bench-plot)
x: arithmetic intensity, FLOP per byte of weights touched (the rows' flop /
   weight_bytes: router + used experts + shared expert, bf16 rows count 2 bytes);
   forward+backward rows count 3x the FLOPs over the same bytes
y: GFLOP/s, log-log. Roofs: the FMA peak (horizontal) and read bandwidth x
   intensity (slanted), both from the run's own {"type": "ceiling"} row.
One marker per (variant, shape, T) row: colour = variant, marker = shape,
hollow = forward+backward, the number beside it = T. Python 3 stdlib only.
"""
import html
import json
import math
import sys

W, H = 1000, 620
L, TOP, R, B = 80, 50, 660, 560          # plot box in px
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
           "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
MARKERS = ["circle", "square", "triangle", "diamond"]


def load(path):
    ceiling, rows = None, []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if r.get("type") == "ceiling":
                ceiling = r                  # the last one: the run's own
            elif r.get("gflops") and r.get("weight_gbs"):
                # older rows have no flop / weight_bytes: their ratio is the same
                r["ai"] = r["flop"] / r["weight_bytes"] if r.get("weight_bytes") else r["gflops"] / r["weight_gbs"]
                r.setdefault("impl", f"variant {r.get('variant')}")
                rows.append(r)
    return ceiling, rows


def decades(lo, hi):
    return math.floor(math.log10(lo)), math.ceil(math.log10(hi))


def marker(kind, x, y, colour, hollow, tip):
    fill = "white" if hollow else colour
    style = f'fill="{fill}" stroke="{colour}" stroke-width="1.5"'
    s = 4.5
    if kind == "circle":
        shape = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{s}" {style}>'
        end = "</circle>"
    elif kind == "square":
        shape = f'<rect x="{x - s:.1f}" y="{y - s:.1f}" width="{2 * s}" height="{2 * s}" {style}>'
        end = "</rect>"
    else:
        pts = ([(x, y - 1.3 * s), (x + 1.2 * s, y + s), (x - 1.2 * s, y + s)] if kind == "triangle" else
               [(x, y - 1.4 * s), (x + 1.4 * s, y), (x, y + 1.4 * s), (x - 1.4 * s, y)])
        shape = f'<polygon points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}" {style}>'
        end = "</polygon>"
    return f"{shape}<title>{html.escape(tip)}</title>{end}" if tip else shape + end


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "build/bench.json"
    dst = sys.argv[2] if len(sys.argv) > 2 else "build/roofline.svg"
    ceiling, rows = load(src)
    if not rows:
        sys.exit(f"{src}: no result rows")
    peak = ceiling["peak_gflops"] if ceiling else None
    bw = ceiling["read_gbs"] if ceiling else None

    ais = [r["ai"] for r in rows] + ([peak / bw] if ceiling else [])
    ys = [r["gflops"] for r in rows] + ([peak] if ceiling else [])
    x0, x1 = decades(min(ais) / 1.5, max(ais) * 1.5)
    y0, y1 = decades(min(ys) / 1.5, max(ys) * 1.5)

    def px(ai):
        return L + (math.log10(ai) - x0) / (x1 - x0) * (R - L)

    def py(g):
        return B - (math.log10(g) - y0) / (y1 - y0) * (B - TOP)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>']
    title = "moe.h MoE layer vs peers: roofline (fp32 FMA peak and read bandwidth measured in the same run)"
    out.append(f'<text x="{L}" y="22" font-size="14" font-weight="bold">{html.escape(title)}</text>')
    if ceiling:
        sub = (f"{ceiling.get('threads', '?')} threads, {ceiling.get('isa', '?')}: "
               f"peak {peak:.1f} GFLOP/s, read {bw:.1f} GB/s; source {src}")
        one = ceiling.get("peak_1thread_gflops")
        if one and peak < 0.8 * ceiling.get("threads", 1) * one:   # moe_bench's busy-machine test
            sub += "; WARNING: busy machine, peak did not scale with threads"
    else:
        sub = f"no ceiling row in {src}: roofs not drawn"
    out.append(f'<text x="{L}" y="40" fill="#555">{html.escape(sub)}</text>')

    # grid: decades labelled, 2..9 faint
    out.append(f'<clipPath id="box"><rect x="{L}" y="{TOP}" width="{R - L}" height="{B - TOP}"/></clipPath>')
    for d in range(x0, x1 + 1):
        for m in range(1, 10):
            v = m * 10.0 ** d
            if v > 10.0 ** x1:
                break
            x = px(v)
            out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{B}" stroke="{"#ccc" if m == 1 else "#eee"}"/>')
            if m == 1:
                out.append(f'<text x="{x:.1f}" y="{B + 16}" text-anchor="middle">{v:g}</text>')
    for d in range(y0, y1 + 1):
        for m in range(1, 10):
            v = m * 10.0 ** d
            if v > 10.0 ** y1:
                break
            y = py(v)
            out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{R}" y2="{y:.1f}" stroke="{"#ccc" if m == 1 else "#eee"}"/>')
            if m == 1:
                out.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
    out.append(f'<rect x="{L}" y="{TOP}" width="{R - L}" height="{B - TOP}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{(L + R) / 2}" y="{B + 36}" text-anchor="middle">'
               'arithmetic intensity, FLOP per byte of weights touched</text>')
    out.append(f'<text x="20" y="{(TOP + B) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 20 {(TOP + B) / 2})">GFLOP/s</text>')

    # roofs: bandwidth x intensity up to the ridge, then the peak
    if ceiling:
        ridge = peak / bw
        xa = max(10.0 ** x0, 10.0 ** y0 / bw)
        pts = [(xa, bw * xa), (ridge, peak), (10.0 ** x1, peak)]
        out.append(f'<polyline clip-path="url(#box)" fill="none" stroke="#000" stroke-width="2" points="'
                   + " ".join(f"{px(a):.1f},{py(g):.1f}" for a, g in pts) + '"/>')
        out.append(f'<text x="{R - 6}" y="{py(peak) - 6:.1f}" text-anchor="end">'
                   f'FMA peak {peak:.0f} GFLOP/s</text>')
        # label the slanted roof along its own angle, a bit left of the ridge
        xl = max(xa * 1.5, ridge / 30)
        ang = math.degrees(math.atan2(py(bw * ridge) - py(bw * xl), px(ridge) - px(xl)))
        out.append(f'<text x="{px(xl):.1f}" y="{py(bw * xl) - 6:.1f}" '
                   f'transform="rotate({ang:.1f} {px(xl):.1f} {py(bw * xl) - 6:.1f})">read {bw:.1f} GB/s</text>')

    impls, shapes = [], []
    for r in rows:
        if r["impl"] not in impls:
            impls.append(r["impl"])
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    colour = {k: COLOURS[i % len(COLOURS)] for i, k in enumerate(impls)}
    mark = {k: MARKERS[i % len(MARKERS)] for i, k in enumerate(shapes)}
    bwd = {r["impl"] for r in rows if r.get("pass") == "fwd+bwd"}

    out.append('<g clip-path="url(#box)">')
    for r in rows:
        x, y = px(r["ai"]), py(r["gflops"])
        pct = f", {r['pct_peak']:.0f}% of peak, {r['pct_bw']:.0f}% of bw" if r.get("pct_peak") is not None else ""
        tip = (f"{r['impl']} ({r.get('pass', 'fwd')}), {r['shape']} T={r['T']}: {r['median_ms']:.2f} ms, "
               f"{r['gflops']:.1f} GFLOP/s, {r['weight_gbs']:.1f} GB/s{pct}")
        out.append(marker(mark[r["shape"]], x, y, colour[r["impl"]], r["impl"] in bwd, tip))
        out.append(f'<text x="{x + 6:.1f}" y="{y - 5:.1f}" font-size="9" fill="{colour[r["impl"]]}">{r["T"]}</text>')
    out.append("</g>")

    # legend: variants by colour, shapes by marker
    y = TOP + 8
    out.append(f'<text x="{R + 20}" y="{y}" font-weight="bold">variant</text>')
    for k in impls:
        y += 20
        out.append(marker("circle", R + 28, y - 4, colour[k], k in bwd, None))
        out.append(f'<text x="{R + 42}" y="{y}">{html.escape(k)}</text>')
    y += 32
    out.append(f'<text x="{R + 20}" y="{y}" font-weight="bold">shape</text>')
    for k in shapes:
        y += 20
        out.append(marker(mark[k], R + 28, y - 4, "#555", False, None))
        out.append(f'<text x="{R + 42}" y="{y}">{html.escape(k)}</text>')
    for note in ("", "number beside a marker: T tokens", "hollow: forward + backward",
                 "(3x the forward FLOPs, same bytes)"):
        y += 18
        out.append(f'<text x="{R + 20}" y="{y}" fill="#555">{note}</text>')
    out.append("</svg>")
    with open(dst, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"{dst}: {len(rows)} rows, {len(impls)} variants"
          + (f", peak {peak:.1f} GFLOP/s, read {bw:.1f} GB/s" if ceiling else ", no ceiling row"))


if __name__ == "__main__":
    main()
