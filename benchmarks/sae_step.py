"""One SAE training step, saelab against SAELens, on identical random activations (fp32, CPU).

For the ReLU-L1 step and the TopK step, each implementation runs the whole step its trainer runs — forward,
backward, gradient clipping, Adam, and its dead-latent bookkeeping — from the same initial weights on the same
batch. The table gives milliseconds per step, tokens per second, and the fraction of this machine's measured fp32
matmul peak that the tokens per second amount to, counting the dense step's 10·d_in·d_sae FLOP per token (five
d_in × d_sae matrix products of 2 FLOP per multiply-add). Sparse steps (TopK's decoder, saelab's trained ReLU
step) do less than that, so their "dense-equivalent" fraction can exceed 100 %.

The ReLU step runs in two regimes. At initialisation (b_enc = 0) half of the latents fire, so the step is dense.
A trained ReLU SAE fires a few percent: the "trained" rows start both implementations from the same weights with
b_enc lowered to TRAINED_B_ENC, where about 2 % of the latents fire on these N(0, I) activations (the L0 is
printed). saelab's fused step then runs all but the encoder product sparse; SAELens's step is dense regardless.

    python benchmarks/sae_step.py                  # d_in 256, d_sae 4096, batch 4096, 1 and 2 threads
    python benchmarks/sae_step.py --smoke          # tiny sizes: checks that everything runs

Run it on a quiet machine: every figure is a median over repeats, but other processes still distort it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from saelab.sae.model import SAEConfig, build_sae
from saelab.sae.train import train_step

# Encoder columns have unit norm and x ~ N(0, I), so pre-activations are N(b_enc, 1): P(N(0, 1) > 2) ≈ 2.3 %.
TRAINED_B_ENC = -2.0


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(size: int, repeats: int) -> float:
    """Best fp32 GFLOP/s of a square matrix product at the current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    best = min(median_seconds(lambda: torch.mm(a, b, out=out), 1, warmup=1) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def saelab_step(
    architecture: str, weights: dict[str, torch.Tensor], k: int, fast: bool
) -> Callable[[torch.Tensor], float]:
    """saelab's training step (saelab.sae.train.train_step) plus the trainer's tokens-since-fired update."""
    d_in, d_sae = weights["W_enc"].shape
    sae = build_sae(SAEConfig(architecture, d_in, d_sae, k=k, sparsity_coefficient=5.0))
    with torch.no_grad():
        for name, value in weights.items():
            getattr(sae, name).copy_(value)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-5)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    dead = torch.zeros(d_sae, dtype=torch.bool)

    def step(x: torch.Tensor) -> float:
        out = train_step(sae, optimizer, x, dead, grad_clip=1.0, fast=fast)
        since_fired.add_(x.shape[0])  # the trainer's dead-latent bookkeeping
        since_fired[out.fired > 0] = 0
        return float(out.loss.detach())

    return step


def sae_lens_step(architecture: str, weights: dict[str, torch.Tensor], k: int) -> Callable[[torch.Tensor], float]:
    """SAELens 6's training step (SAETrainer._train_step): forward, firing statistics, backward, clip, Adam."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    d_in, d_sae = weights["W_enc"].shape
    if architecture == "relu":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=5.0))
        coefficients = {"l1": 5.0}
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
        coefficients = {}
    with torch.no_grad():
        for name, value in weights.items():
            getattr(sae, name).copy_(value)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-5)
    since_fired = torch.zeros(d_sae)
    dead = torch.zeros(d_sae, dtype=torch.bool)

    def step(x: torch.Tensor) -> float:
        out = sae.training_forward_pass(TrainStepInput(x, coefficients, dead, 0, False))
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            did_fire = firing.sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return float(out.loss.detach())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one thread, two repeats")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.d_in, args.d_sae, args.k, args.threads, args.repeats = 256, 32, 256, 8, "1", 2
    try:
        import sae_lens  # noqa: F401

        have_sae_lens = True
    except ImportError:
        have_sae_lens = False

    generator = torch.Generator().manual_seed(0)
    d_in, d_sae = args.d_in, args.d_sae
    W_dec = torch.randn(d_sae, d_in, generator=generator)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    weights = {"W_enc": W_dec.T.contiguous(), "W_dec": W_dec, "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_in)}
    trained = weights | {"b_enc": torch.full((d_sae,), TRAINED_B_ENC)}
    x = torch.randn(args.tokens, d_in, generator=generator)
    dense_flop_per_token = 10 * d_in * d_sae
    print(f"d_in {d_in}, d_sae {d_sae}, batch {args.tokens}, TopK k = {args.k}, fp32, torch {torch.__version__}")
    for regime, w in (("init", weights), ("trained", trained)):
        l0 = float((torch.addmm(w["b_enc"], x, w["W_enc"]) > 0).sum(dim=1).float().mean())
        print(f"ReLU {regime}: b_enc = {float(w['b_enc'][0]):g}, L0 = {l0:.1f} = {100 * l0 / d_sae:.1f} % of d_sae")
    header = ("threads", "step", "regime", "implementation", "ms/step", "tokens/s", "% peak", "vs SAELens")
    print("{:>7} {:<9} {:<8} {:<22} {:>9} {:>10} {:>7} {:>10}".format(*header))
    cases = (("relu", "ReLU-L1", "init", weights), ("relu", "ReLU-L1", "trained", trained))
    cases += (("topk", f"TopK k={args.k}", "init", weights),)
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        peak = matmul_peak(512 if args.smoke else 2048, args.repeats)
        print(f"{threads:>7} {'matmul':<9} {'':<8} {'fp32 peak (square mm)':<22} {'':>9} {'':>10} {peak:>6.1f}G")
        for architecture, label, regime, start in cases:
            rows = [
                ("saelab (fused/sparse)", saelab_step(architecture, start, args.k, fast=True)),
                ("saelab (reference)", saelab_step(architecture, start, args.k, fast=False)),
            ]
            if have_sae_lens:
                rows.append(("SAELens 6", sae_lens_step(architecture, start, args.k)))
            seconds = {name: median_seconds(lambda step=step: step(x), args.repeats) for name, step in rows}
            for name, s in seconds.items():
                tokens_per_s = args.tokens / s
                fraction = 100 * tokens_per_s * dense_flop_per_token / (peak * 1e9)
                speedup = f"{seconds['SAELens 6'] / s:.2f}x" if have_sae_lens else "n/a"
                figures = f"{1e3 * s:>9.1f} {tokens_per_s:>10.0f} {fraction:>6.0f}% {speedup:>10}"
                print(f"{threads:>7} {label:<9} {regime:<8} {name:<22} {figures}")
    if not have_sae_lens:
        print("(sae_lens is not installed here: SAELens rows skipped)")


if __name__ == "__main__":
    main()
