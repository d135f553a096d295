"""Toy-model training throughput: the batched model against a plain per-instance loop, and phase-diagram wall time.

Rows, each at 1 and 2 torch threads:
- `loop`: one single-instance ToyModel after another, plain batches + autograd + torch.optim.Adam — the
  straightforward way to train many toy models;
- `batched reference`: all instances in one ToyModel, the same plain batches + autograd (method="reference");
- `batched fast`: non-empty rows, hand-derived gradients, fused Adam (method="fast", the default).
Throughput is instances × steps per second (the loop is timed on a few instances and scaled per instance). Then the
wall time of the default 20×20 phase diagrams (target: under 60 s on 2 cores), training and replica selection.

    .venv/bin/python benchmarks/toy.py            # full measurement (a few minutes on 2 cores; run on an idle machine)
    .venv/bin/python benchmarks/toy.py --smoke    # tiny sizes, to check that everything runs
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from saelab.toy import PhaseDiagramConfig, ToyModel, ToyModelConfig, ToyTrainConfig, run_phase_diagram, train_toy_model
from saelab.toy.phase import phase_train_config

SETUPS = {  # name: (model config, batch size)
    "5 features / 2 dims, p=0.05": (ToyModelConfig(5, 2, n_instances=64, feature_probability=0.05), 512),
    "2 features / 1 dim, phase sweep": (ToyModelConfig(2, 1, n_instances=2400, feature_probability=0.1), 64),
    "20 features / 5 dims, p=0.01": (ToyModelConfig(20, 5, n_instances=16, feature_probability=0.01), 512),
}


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def batched_rate(cfg: ToyModelConfig, batch: int, steps: int, method: str) -> float:
    model = ToyModel(cfg)
    train = ToyTrainConfig(steps=steps, batch_size=batch, method=method)
    train_toy_model(model, replace(train, steps=5), progress=False)  # warm-up (first-call costs)
    return cfg.n_instances * steps / seconds(lambda: train_toy_model(model, train, progress=False))


def loop_rate(cfg: ToyModelConfig, batch: int, steps: int, instances: int) -> float:
    single = replace(cfg, n_instances=1)
    train = ToyTrainConfig(steps=steps, batch_size=batch, method="reference")
    train_toy_model(ToyModel(single), replace(train, steps=5), progress=False)
    total = sum(seconds(lambda: train_toy_model(ToyModel(single), train, progress=False)) for _ in range(instances))
    return instances * steps / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that the script runs")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    steps, loop_instances = (20, 2) if args.smoke else (300, 4)

    print(f"torch {torch.__version__}, {steps} steps per run; throughput in instance-steps per second\n")
    print(f"{'setup':<34} {'threads':>7} {'loop':>10} {'batched ref':>12} {'batched fast':>13} {'fast/loop':>10}")
    for name, (cfg, batch) in SETUPS.items():
        if args.smoke:
            cfg = replace(cfg, n_instances=min(cfg.n_instances, 8))
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            loop = loop_rate(cfg, batch, steps, loop_instances)
            reference = batched_rate(cfg, batch, steps, "reference")
            fast = batched_rate(cfg, batch, steps, "fast")
            print(f"{name:<34} {n_threads:>7} {loop:>10.0f} {reference:>12.0f} {fast:>13.0f} {fast / loop:>9.0f}×")

    print("\nphase diagrams (default training, replicas as in run_toy_lab): wall seconds")
    print(f"{'diagram':<34} {'threads':>7} {'instances':>10} {'seconds':>9}")
    train = phase_train_config()
    if args.smoke:
        train = replace(train, steps=10)
    for n, m, replicas in ((2, 1, 6), (3, 2, 4)):
        cfg = PhaseDiagramConfig(n_features=n, d_hidden=m, grid=4 if args.smoke else 20, replicas=replicas)
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            wall = seconds(lambda cfg=cfg: run_phase_diagram(cfg, train, progress=False))
            label = f"{cfg.grid}×{cfg.grid}, n={n} m={m}"
            print(f"{label:<34} {n_threads:>7} {cfg.grid**2 * replicas:>10} {wall:>9.1f}")


if __name__ == "__main__":
    main()
