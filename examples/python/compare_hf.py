#!/usr/bin/env python3
"""moe.h beside HF transformers' MixtralSparseMoeBlock and Qwen2MoeSparseMoeBlock.

Each block is built from a small config with random weights, its tensors are
handed to moe.h as they are (transformers 5.x stores the experts fused:
experts.gate_up_proj [E][2F][D], experts.down_proj [E][D][F], which
moe_weights.gate_up_fused reads), and both run the same float32 tokens.
Printed per block: the max abs and relative error of y, the routing agreement
(fraction of tokens whose top-k expert set is the same), and the median time
of a forward of each (moe.h also with packed weights where its kernels are
SIMD). Needs: pip install ./python torch transformers

    python3 examples/python/compare_hf.py [--tokens 512] [--reps 10] [--threads N]
"""
import argparse
import os
import time

# Two OpenMP runtimes share this process (PyTorch's and the extension's), each
# spinning its idle threads after a parallel region: on a machine with few
# cores they starve each other (seen here: 5 ms forwards taking 700 ms).
# Idle threads that sleep keep both timings honest; set before either starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import MixtralConfig, Qwen2MoeConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402

import moe  # noqa: E402


def median_time(fn, reps):
    fn()                                        # warm-up: first-touch, thread start
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def fill(block, seed, scale=0.1):
    """A block made from a config holds uninitialised tensors: fill every one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def hf_block(cls, config):
    if getattr(config, "_experts_implementation", None) is None:
        config._experts_implementation = "eager"
    return cls(config).eval()


def mixtral(args):
    D, F, E, K = args.d_model, args.d_ff, 8, 2
    config = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                           num_experts_per_tok=K, router_jitter_noise=0.0)
    block = hf_block(MixtralSparseMoeBlock, config)
    fill(block, 1)
    cfg = moe.Config("mixtral", num_experts=E, top_k=K, d_model=D, d_ff=F,
                     num_threads=args.threads)
    return block, cfg, K, {}


def qwen2_moe(args):
    D, F, Fs, E, K = args.d_model, args.d_ff // 4, args.d_ff, 16, 4
    config = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F,
                            shared_expert_intermediate_size=Fs, num_experts=E,
                            num_experts_per_tok=K, norm_topk_prob=False)
    block = hf_block(Qwen2MoeSparseMoeBlock, config)
    fill(block, 2)
    cfg = moe.Config("qwen2_moe", num_experts=E, top_k=K, d_model=D, d_ff=F, shared_d_ff=Fs,
                     num_threads=args.threads)
    p = lambda n: block.get_parameter(n).detach().numpy()   # noqa: E731  (HF name -> array)
    shared = dict(shared_gate=p("shared_expert.gate_proj.weight"),
                  shared_up=p("shared_expert.up_proj.weight"),
                  shared_down=p("shared_expert.down_proj.weight"),
                  shared_expert_gate=p("shared_expert_gate.weight"))       # [1][D]
    return block, cfg, K, shared


def compare(name, make, args):
    block, cfg, K, extra = make(args)
    p = lambda n: block.get_parameter(n).detach().numpy()   # noqa: E731  (views, no copies)
    w = moe.Weights(cfg, fused=True, router=p("gate.weight"), gate=p("experts.gate_up_proj"),
                    down=p("experts.down_proj"), **extra)
    x = np.random.default_rng(3).standard_normal((args.tokens, cfg.d_model)).astype(np.float32)
    xt = torch.from_numpy(x).view(1, args.tokens, cfg.d_model)

    with torch.no_grad():
        y_hf = block(xt).view(args.tokens, -1).numpy()
        hf_experts = block.gate(xt.view(args.tokens, -1))[2].numpy()
    y, info = moe.forward(cfg, w, x)

    err = np.abs(y - y_hf)
    same = np.mean([set(a) == set(b) for a, b in zip(info.expert, hf_experts)])
    with torch.no_grad():
        t_hf = median_time(lambda: block(xt), args.reps)
    t_moe = median_time(lambda: moe.forward(cfg, w, x), args.reps)
    line = ("%-10s T=%d D=%d E=%d K=%d  max abs err %.2e  max rel err %.2e  routing agreement "
            "%.4f\n           HF (experts %s) %.2f ms   moe.h %.2f ms" % (
                name, args.tokens, cfg.d_model, cfg.num_experts, K, err.max(),
                err.max() / np.abs(y_hf).max(), same, block.experts.config._experts_implementation,
                t_hf * 1e3, t_moe * 1e3))
    if moe.compiled_isa() != "reference":
        wp = moe.pack(cfg, w)
        y_p, _ = moe.forward(cfg, wp, x)
        t_packed = median_time(lambda: moe.forward(cfg, wp, x), args.reps)
        line += "   moe.h packed %.2f ms (max abs err %.2e)" % (t_packed * 1e3,
                                                              np.abs(y_p - y_hf).max())
    print(line)
    return err.max() / np.abs(y_hf).max(), same


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0,
                    help="threads of both (0: each library's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    print("moe.h %s (%s kernels%s), torch %s (%d threads), transformers %s" % (
        moe.__version__, moe.compiled_isa(), ", OpenMP" if moe.has_openmp() else "",
        torch.__version__, torch.get_num_threads(), transformers.__version__))
    ok = True
    for name, make in (("mixtral", mixtral), ("qwen2_moe", qwen2_moe)):
        rel, same = compare(name, make, args)
        ok = ok and rel < 1e-4 and same > 0.99   # a near-tie may flip a token's k-th expert
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
