"""Cost of the LLC estimate: saelab's batched SGLD against devinterp's SGLD optimiser run one instance at a time.

One estimate = `chains` chains × (burnin + draws) SGLD steps at one snapshot. Rows, each at 1 and 2 torch threads,
for the 6-feature / 2-dimension toy model of Chen et al. (18 parameters per instance) at the default settings
(4 chains × 600 steps, minibatch 100):

- `devinterp loop`: for each instance and chain, a single-instance ToyModel, `devinterp.optim.SGLD` and autograd
  through the plain model — what one writes with devinterp (the reference; the first 300 steps of one chain are
  timed and scaled to `chains × (burnin + draws)` steps, per instance: its cost per step is constant);
- `saelab batched`: `saelab.toy.llc.toy_llc`, all instances × chains as one batch with hand-derived gradients,
  at 1, 16, 64 and 256 instances.

Printed: milliseconds per snapshot per instance, and the speed-up over the loop.

    .venv/bin/python benchmarks/llc.py            # a minute or two on 2 cores (run on an idle machine)
    .venv/bin/python benchmarks/llc.py --smoke    # tiny sizes, to check that everything runs
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from saelab.toy import ToyModel, ToyModelConfig
from saelab.toy.llc import LLCConfig, toy_dataset, toy_llc


def model_with(instances: int) -> ToyModel:
    torch.manual_seed(0)
    return ToyModel(ToyModelConfig(n_features=6, d_hidden=2, n_instances=instances, feature_probability=0.01))


def saelab_ms(instances: int, cfg: LLCConfig) -> float:
    model = model_with(instances)
    toy_llc(model, LLCConfig(chains=cfg.chains, draws=2, burnin=0))  # warm-up
    start = time.perf_counter()
    toy_llc(model, cfg)
    return 1000 * (time.perf_counter() - start) / instances


def devinterp_ms(instances: int, cfg: LLCConfig) -> float:
    """Milliseconds per instance for `cfg.chains` chains, from timing up to 300 steps of one chain per instance."""
    from devinterp.optim.sgld import SGLD

    model = model_with(instances)
    data = toy_dataset(model, cfg.n_samples, cfg.seed).permute(2, 0, 1)  # [n, instances, feat]
    start = time.perf_counter()
    for i in range(instances):
        single = ToyModel(ToyModelConfig(n_features=6, d_hidden=2, n_instances=1, feature_probability=0.01))
        with torch.no_grad():
            single.W.copy_(model.W[i : i + 1])
            single.b_final.copy_(model.b_final[i : i + 1])
        rows = data[:, i : i + 1]
        optimizer = SGLD(single.parameters(), lr=cfg.step_size, localization=cfg.localization, nbeta=cfg.nbeta)
        losses = []
        timed = min(cfg.burnin + cfg.draws, 300)
        for _ in range(timed):
            batch = rows[torch.randint(cfg.n_samples, (cfg.batch_size,))]
            optimizer.zero_grad()
            loss = single.loss_per_instance(batch).sum()
            loss.backward()
            losses.append(loss.detach())
            optimizer.step()
        torch.stack(losses).mean().item()
    scale = cfg.chains * (cfg.burnin + cfg.draws) / timed
    return 1000 * scale * (time.perf_counter() - start) / instances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that the script runs")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    args = parser.parse_args()
    cfg = LLCConfig(draws=20, burnin=5) if args.smoke else LLCConfig()
    batched = (1, 4) if args.smoke else (1, 16, 64, 256)
    loop_instances = 1
    load = os.getloadavg()[0]
    print(f"LLC estimate per snapshot: {cfg.chains} chains × {cfg.burnin + cfg.draws} SGLD steps, minibatch "
          f"{cfg.batch_size}, 6 features / 2 dims; load average at start {load:.1f}")  # fmt: skip
    print(f"{'threads':>7} | {'method':<24} | {'instances':>9} | {'ms / snapshot / instance':>24} | speed-up")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        reference = devinterp_ms(loop_instances, cfg)
        print(f"{threads:>7} | {'devinterp SGLD loop':<24} | {loop_instances:>9} | {reference:>24.1f} | 1.0×")
        for instances in batched:
            ms = saelab_ms(instances, cfg)
            print(f"{threads:>7} | {'saelab batched':<24} | {instances:>9} | {ms:>24.2f} | {reference / ms:.0f}×")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
