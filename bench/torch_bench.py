"""bench/torch_bench.py -- the PyTorch peers of bench/moe_bench.c, same shapes.

run: OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 python3 bench/torch_bench.py [max_T] [json]
variant 10: the HF transformers eager expert loop (softmax, top-k, renormalise,
            per expert: index rows, gate/up linear, SiLU * up, down linear,
            index_add_ scaled by the routing weight), fp32, torch.no_grad
variant 11: the same routing, experts by torch._grouped_mm on tokens sorted by
            expert (skipped when this torch build has no CPU grouped_mm)
variant 12: variant 10 forward + autograd backward (loss = sum(y * dy)), the
            experts as separate per-expert tensors (HF 4.x ModuleList style:
            indexing a fused [E, F, D] leaf makes autograd scatter into a
            full-size zero gradient per expert, which is far slower)
Shapes as in moe_bench.c; qwen-mini adds a shared expert (Fs = 1536) scaled
by sigmoid(x . w_sg), as HF Qwen2MoeSparseMoeBlock does.
Rows: median and min-max of N runs after one warm-up, GFLOP/s of the FLOPs
done (router + 6 D F per routed pair + shared expert; x3 for forward+backward),
GB/s of the weights touched (router + used experts + shared expert).
%peak and %bw divide by the machine ceilings that moe_bench measured earlier in
the same run: the last {"type": "ceiling"} row of the JSON file (bench/run_bench.sh
runs moe_bench first); without one the columns stay empty.
"""
import json
import statistics
import sys
import time

import torch


NAMES = {10: "torch HF expert loop", 11: "torch _grouped_mm", 12: "torch HF loop + autograd backward"}


def make_layer(D, F, E, Fs, gen):
    s = 0.03

    def r(*shape):
        return (torch.rand(*shape, generator=gen) * 2 - 1) * s

    w = {"router": r(E, D), "gate": r(E, F, D), "up": r(E, F, D), "down": r(E, D, F)}
    if Fs:
        w.update(sh_gate=r(Fs, D), sh_up=r(Fs, D), sh_down=r(D, Fs), sh_expert_gate=r(1, D))
    return w


def shared(x, w, y):
    """y += sigmoid(x . w_sg) * SwiGLU shared expert(x), when the layer has one."""
    if "sh_gate" in w:
        h = torch.nn.functional.silu(x @ w["sh_gate"].T) * (x @ w["sh_up"].T)
        y = y + torch.sigmoid(x @ w["sh_expert_gate"].T) * (h @ w["sh_down"].T)
    return y


def read_ceiling(path):
    """The last ceiling row moe_bench wrote into this run's JSON file, or None."""
    row = None
    try:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r.get("type") == "ceiling":
                    row = r
    except (OSError, ValueError):
        pass
    return row


def busy(ceil):
    """moe_bench's own test: the n-thread FMA peak below 0.8 n times the 1-thread one."""
    one = ceil.get("peak_1thread_gflops")
    return bool(one) and ceil["peak_gflops"] < 0.8 * ceil.get("threads", 1) * one


def route(x, w, K, renorm):
    p = torch.softmax(x @ w["router"].T, dim=-1, dtype=torch.float32)
    vals, idx = torch.topk(p, K, dim=-1)
    if renorm:
        vals = vals / vals.sum(-1, keepdim=True)
    return vals, idx


def hf_loop(x, w, K, renorm):
    vals, idx = route(x, w, K, renorm)
    y = torch.zeros_like(x)
    E = w["router"].shape[0]
    hit = torch.bincount(idx.flatten(), minlength=E)
    for e in torch.nonzero(hit).flatten().tolist():
        tok, slot = torch.where(idx == e)
        xe = x[tok]
        h = torch.nn.functional.silu(xe @ w["gate"][e].T) * (xe @ w["up"][e].T)
        y.index_add_(0, tok, (h @ w["down"][e].T) * vals[tok, slot, None])
    return shared(x, w, y), idx


def grouped(x, w, K, renorm):
    vals, idx = route(x, w, K, renorm)
    T, D = x.shape
    E = w["router"].shape[0]
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    tok = order // K
    counts = torch.bincount(flat, minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[tok]
    g = torch._grouped_mm(xs, w["gate"].transpose(1, 2), offs=offs)
    u = torch._grouped_mm(xs, w["up"].transpose(1, 2), offs=offs)
    o = torch._grouped_mm(torch.nn.functional.silu(g) * u, w["down"].transpose(1, 2), offs=offs)
    y = torch.zeros_like(x)
    y.index_add_(0, tok, o * vals.flatten()[order, None])
    return shared(x, w, y), idx


def timed(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def main():
    max_T = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    path = sys.argv[2] if len(sys.argv) > 2 else None
    ceil = read_ceiling(path) if path else None
    out = open(path, "a") if path else None
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    # name, D, F, E, K, renormalise, shared expert width
    shapes = [("mixtral-mini", 1024, 3584, 8, 2, True, 0), ("deepseek-mini", 1024, 512, 64, 6, False, 0),
              ("qwen-mini", 1024, 384, 60, 4, False, 1536)]
    layers = {name: make_layer(D, F, E, Fs, gen) for name, D, F, E, K, _, Fs in shapes}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if ceil:
        print(f"# ceilings from {path}: FMA peak {ceil['peak_gflops']:.1f} GFLOP/s, read {ceil['read_gbs']:.1f} GB/s")
        if busy(ceil):
            print("# WARNING: moe_bench found the machine busy (its FMA peak did not scale with threads)")
    else:
        print("# no ceiling row in the JSON file: %peak and %bw left empty (run bench/run_bench.sh)")
    print(f"{'shape':14s} {'T':>5s}  {'v':>2s}  {'median ms':>10s}  {'min-max ms':19s} {'GFLOP/s':>7s} {'GB/s':>7s}"
          f" {'%peak':>6s} {'%bw':>6s}")
    for T in [t for t in (1, 16, 128, 1024) if t <= max_T]:
        for name, D, F, E, K, renorm, Fs in shapes:
            w = layers[name]
            x = (torch.rand(T, D, generator=gen) * 2 - 1)
            dy = (torch.rand(T, D, generator=gen) * 2 - 1)
            runs = 3 if T >= 128 else 7
            with torch.no_grad():
                _, idx = hf_loop(x, w, K, renorm)
            used = int((torch.bincount(idx.flatten(), minlength=E) > 0).sum())
            flops = 2.0 * T * D * E + 6.0 * T * K * D * F + (6.0 * T * D * Fs + 2.0 * T * D if Fs else 0.0)
            wbytes = 4.0 * (E * D + 3.0 * used * D * F + (3.0 * D * Fs + D if Fs else 0.0))
            variants = [(10, lambda: hf_loop(x, w, K, renorm), False)]
            try:
                with torch.no_grad():
                    grouped(x, w, K, renorm)
                variants.append((11, lambda: grouped(x, w, K, renorm), False))
            except Exception as exc:  # no CPU grouped_mm in this build
                print(f"# variant 11 skipped: {type(exc).__name__}: {str(exc)[:80]}")

            per_expert = {k: v.clone().requires_grad_() for k, v in w.items() if k not in ("gate", "up", "down")}
            for k in ("gate", "up", "down"):
                per_expert[k] = [t.clone().requires_grad_() for t in w[k]]
            params = [t for v in per_expert.values() for t in (v if isinstance(v, list) else [v])]

            def fwd_bwd():
                for t in params:
                    t.grad = None
                xg = x.detach().requires_grad_()
                y, _ = hf_loop(xg, per_expert, K, renorm)
                (y * dy).sum().backward()

            variants.append((12, fwd_bwd, True))
            for v, fn, train in variants:
                if train:
                    med, lo, hi = timed(fn, runs)
                else:
                    with torch.no_grad():
                        med, lo, hi = timed(fn, runs)
                f = flops * (3.0 if train else 1.0)
                gflops, gbs = f / med * 1e-9, wbytes / med * 1e-9
                pk = 100.0 * gflops / ceil["peak_gflops"] if ceil else None
                bw = 100.0 * gbs / ceil["read_gbs"] if ceil else None
                pct = f"{pk:6.1f} {bw:6.1f}" if ceil else f"{'':6s} {'':6s}"
                print(f"{name:14s} {T:5d}  {v:2d}  {1e3 * med:10.2f}  {1e3 * lo:9.2f}-{1e3 * hi:<9.2f} "
                      f"{gflops:7.2f} {gbs:7.2f} {pct}", flush=True)
                if out:
                    out.write(json.dumps({"type": "result", "impl": NAMES[v], "pass": "fwd+bwd" if train else "fwd",
                                          "shape": name, "T": T, "variant": v, "median_ms": 1e3 * med,
                                          "min_ms": 1e3 * lo, "max_ms": 1e3 * hi, "flop": f, "weight_bytes": wbytes,
                                          "gflops": gflops, "weight_gbs": gbs, "pct_peak": pk, "pct_bw": bw}) + "\n")
    if out:
        out.close()


if __name__ == "__main__":
    main()
