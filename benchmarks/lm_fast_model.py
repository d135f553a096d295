"""Training speed of the built-in model: saelab's `FastLM` + Muon loop against the same model as a `HookedTransformer`.

Both train the default `LMConfig` (the shipped architecture) on the same random BOS-led batches of
`batch_size × n_ctx` tokens, with the torch thread count set explicitly; the figure is training tokens per second
(forward, backward, optimizer step), after warm-up steps. The HookedTransformer runs with AdamW, as a user of
TransformerLens would train it. A test (tests/test_lm_train.py) checks that both models compute the same function.

    .venv/bin/python benchmarks/lm_fast_model.py              # 1 and 2 threads, 10 timed steps each
    .venv/bin/python benchmarks/lm_fast_model.py --smoke      # tiny model, 2 steps: checks that everything runs
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from saelab.models.builtin import LMConfig
from saelab.models.lm_train import FastLM, LMTrainConfig, make_optimizers


def tokens_per_second(name: str, cfg: LMTrainConfig, threads: int, steps: int, warmup: int = 2) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if name == "saelab FastLM + Muon":
        model = FastLM(cfg.model)
        optimizers = make_optimizers(model, cfg)
    else:
        from transformer_lens import HookedTransformer

        model = HookedTransformer(cfg.model.tl_config())
        optimizers = [torch.optim.AdamW(model.parameters(), lr=cfg.lr)]
    batch = torch.randint(1, cfg.model.d_vocab, (cfg.batch_size, cfg.model.n_ctx + 1))
    batch[:, 0] = 0
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        logits = model(batch[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    return steps * cfg.batch_size * cfg.model.n_ctx / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--smoke", action="store_true", help="tiny model and 2 steps")
    args = parser.parse_args()
    cfg = LMTrainConfig()
    if args.smoke:
        cfg = LMTrainConfig(model=LMConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, n_ctx=16), batch_size=4)
        args.steps = 2
    print(f"model {cfg.model}, batch {cfg.batch_size} x {cfg.model.n_ctx} tokens")
    print(f"{'implementation':<28}" + "".join(f"{f'{t} thread(s)':>16}" for t in args.threads))
    for name in ("saelab FastLM + Muon", "HookedTransformer + AdamW"):
        rates = [tokens_per_second(name, cfg, threads, args.steps) for threads in args.threads]
        print(f"{name:<28}" + "".join(f"{rate:>11,.0f} tok/s" for rate in rates))


if __name__ == "__main__":
    main()
