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
Rows: median and min-max of N runs after one warm-up, GFLOP/s of the FLOPs
done (router + 6 D F per routed pair; x3 for forward+backward), GB/s of the
weights touched (router + used experts).
"""
import json
import statistics
import sys
import time

import torch


def make_layer(D, F, E, gen):
    s = 0.03
    return {
        "router": (torch.rand(E, D, generator=gen) * 2 - 1) * s,
        "gate": (torch.rand(E, F, D, generator=gen) * 2 - 1) * s,
        "up": (torch.rand(E, F, D, generator=gen) * 2 - 1) * s,
        "down": (torch.rand(E, D, F, generator=gen) * 2 - 1) * s,
    }


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
    return y, idx


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
    return y, idx


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
    out = open(sys.argv[2], "a") if len(sys.argv) > 2 else None
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    shapes = [("mixtral-mini", 1024, 3584, 8, 2, True), ("deepseek-mini", 1024, 512, 64, 6, False)]
    layers = {name: make_layer(D, F, E, gen) for name, D, F, E, K, _ in shapes}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'shape':14s} {'T':>5s}  {'v':>2s}  {'median ms':>10s}  {'min-max ms':19s} {'GFLOP/s':>7s} {'GB/s':>7s}")
    for T in [t for t in (1, 16, 128, 1024) if t <= max_T]:
        for name, D, F, E, K, renorm in shapes:
            w = layers[name]
            x = (torch.rand(T, D, generator=gen) * 2 - 1)
            dy = (torch.rand(T, D, generator=gen) * 2 - 1)
            runs = 3 if T >= 128 else 7
            with torch.no_grad():
                _, idx = hf_loop(x, w, K, renorm)
            used = int((torch.bincount(idx.flatten(), minlength=E) > 0).sum())
            flops = 2.0 * T * D * E + 6.0 * T * K * D * F
            wbytes = 4.0 * (E * D + 3.0 * used * D * F)
            variants = [(10, lambda: hf_loop(x, w, K, renorm), False)]
            try:
                with torch.no_grad():
                    grouped(x, w, K, renorm)
                variants.append((11, lambda: grouped(x, w, K, renorm), False))
            except Exception as exc:  # no CPU grouped_mm in this build
                print(f"# variant 11 skipped: {type(exc).__name__}: {str(exc)[:80]}")

            per_expert = {"router": w["router"].clone().requires_grad_()}
            for k in ("gate", "up", "down"):
                per_expert[k] = [t.clone().requires_grad_() for t in w[k]]

            def fwd_bwd():
                for t in [per_expert["router"]] + per_expert["gate"] + per_expert["up"] + per_expert["down"]:
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
                print(f"{name:14s} {T:5d}  {v:2d}  {1e3 * med:10.2f}  {1e3 * lo:9.2f}-{1e3 * hi:<9.2f} "
                      f"{f / med * 1e-9:7.2f} {wbytes / med * 1e-9:7.2f}")
                if out:
                    out.write(json.dumps({"shape": name, "T": T, "variant": v, "median_ms": 1e3 * med,
                                          "min_ms": 1e3 * lo, "max_ms": 1e3 * hi,
                                          "gflops": f / med * 1e-9, "weight_gbs": wbytes / med * 1e-9}) + "\n")
    if out:
        out.close()


if __name__ == "__main__":
    main()
