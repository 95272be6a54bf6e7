"""The PyTorch peer of bench/moe_cuda_bench.cu on a GPU (bench/gpu_check.sh runs it).

Times torch._grouped_mm for the expert projections of the same layer shapes
(bf16, tokens spread evenly over the experts, as random routing gives on
average): gate and up as one [D, 2F] matrix per expert, SwiGLU, then down.
Only the expert FFN is timed (no routing, gather or combine), so it is a
ceiling for what a PyTorch MoE layer built on it reaches; TFLOP/s count the
GEMMs' FLOPs, as moe_cuda_bench does. Prints SKIP when torch, a GPU or
torch._grouped_mm is missing.
"""
import sys

SHAPES = [("mixtral", 4096, 14336, 8, 2, (4096, 16384)),
          ("fine", 2048, 1408, 64, 6, (4096, 16384))]


def main():
    try:
        import torch
    except ImportError:
        print("SKIP torch_grouped_mm: no torch")
        return 0
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        print("SKIP torch_grouped_mm: no GPU or no torch._grouped_mm (torch %s)"
              % torch.__version__)
        return 0
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    for name, D, F, E, K, Ts in SHAPES:
        # weights stored [E][N][K] (nn.Linear) and passed transposed: column-major B
        w1 = (torch.rand(E, 2 * F, D, device=dev, generator=gen) - 0.5).bfloat16() * 0.04
        w2 = (torch.rand(E, D, F, device=dev, generator=gen) - 0.5).bfloat16() * 0.04
        for T in Ts:
            M = T * K
            a = (torch.rand(M, D, device=dev, generator=gen) - 0.5).bfloat16()
            ends = [(M * (e + 1)) // E for e in range(E)]
            offs = torch.tensor(ends, device=dev, dtype=torch.int32)

            def step():
                h = torch._grouped_mm(a, w1.transpose(-2, -1), offs=offs)
                g, u = h[:, :F], h[:, F:]
                act = (torch.nn.functional.silu(g) * u).contiguous()
                return torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs)

            try:
                out = step()
            except RuntimeError as err:   # an unsupported layout or GPU: say so, go on
                print("torch._grouped_mm %s T=%d: %s" % (name, T, str(err).splitlines()[0]))
                continue
            if not torch.isfinite(out).all():
                print("FAIL torch._grouped_mm %s T=%d: non-finite output" % (name, T))
                return 1
            for _ in range(2):
                step()
            times = []
            for _ in range(10):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                step()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
            times.sort()
            med = times[len(times) // 2]
            flops = 2.0 * M * 3.0 * D * F
            print("%-13s T=%-6d torch._grouped_mm %8.3f ms (%.3f-%.3f) %7.1f TFLOP/s"
                  % (name, T, med, times[0], times[-1], flops / (med * 1e-3) / 1e12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
