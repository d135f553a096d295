"""Transcoders against an SAE on the built-in model's MLP: how well each replaces the MLP at an equal L0.

Trains, from the same forward passes of the built-in model (default layer 0, 2^19 tokens, 4096 per step), a TopK
transcoder and a TopK skip transcoder from the MLP's input (`blocks.L.ln2.hook_normalized`) to its output
(`blocks.L.hook_mlp_out`), and a TopK SAE of the same size on `blocks.L.hook_mlp_out`, each at d_sae = 16 × d_model
and k = 32 with saelab's defaults otherwise, then evaluates each on held-out tokens with `lm_eval` (the transcoders
spliced in place of the MLP; every dictionary against zero-ablating the MLP's output). Reports CE loss recovered,
KL, KL score, EV of the MLP output, L0, dead fraction, and the CPU time (user + sys of this process) of training
and of evaluating each; set the thread count with OMP_NUM_THREADS (the README's figures: 1 thread).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transcoder.py
    .venv/bin/python benchmarks/transcoder.py --smoke          # tiny sizes, to check that everything runs
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from saelab.models.evals import lm_eval
from saelab.models.store import build_lm_source
from saelab.sae.model import SAEConfig
from saelab.sae.train import SAETrainConfig, train_saes


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=2**19)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.batch_size, args.eval_tokens = 2048, 512, 1024
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    hook_in, hook_out = f"blocks.{args.layer}.ln2.hook_normalized", f"blocks.{args.layer}.hook_mlp_out"
    runs = {  # name: (input hook, output hook or None for an SAE, skip)
        "TopK transcoder": (hook_in, hook_out, False),
        "TopK skip transcoder": (hook_in, hook_out, True),
        "TopK SAE on the MLP output": (hook_out, None, False),
    }
    steps = max(1, args.tokens // args.batch_size)
    rows = []
    for name, (reads, writes, skip) in runs.items():
        started = cpu_seconds()
        source = build_lm_source(None, None, list(dict.fromkeys([reads, writes or reads])), 128, args.batch_size, 0,
                                 "cpu")  # fmt: skip
        d = source.d_ins[reads]
        cfg = SAEConfig("topk", d, 16 * d, k=32, d_out=source.d_ins[writes] if writes else None, skip=skip)
        train = SAETrainConfig(steps=steps, batch_size=args.batch_size, checkpoint_every=0, log_every=steps)
        sae = train_saes(source, cfg, train, progress=False, hooks=[reads], hooks_out=[writes])[0]
        trained = cpu_seconds()
        result = lm_eval(sae, n_tokens=args.eval_tokens)
        rows.append({"dictionary": name, "train_cpu_s": round(trained - started, 1),
                     "eval_cpu_s": round(cpu_seconds() - trained, 1), **result.to_dict()})  # fmt: skip
        rows[-1].pop("density_histogram", None)
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{steps} steps x {args.batch_size} tokens, layer {args.layer}, eval on {args.eval_tokens} tokens, "
          f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f} at the end\n")  # fmt: skip
    header = ("dictionary", "CE loss recovered", "KL", "KL score", "EV of the MLP output", "L0", "dead", "train CPU s",
              "eval CPU s")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for r in rows:
        print(f"| {r['dictionary']} | {r['ce_loss_recovered']:.3f} | {r['kl_div_with_sae']:.3f} | "
              f"{r['kl_div_score']:.3f} | {r['explained_variance']:.3f} | {r['l0']:.1f} | {r['dead_fraction']:.2%} | "
              f"{r['train_cpu_s']} | {r['eval_cpu_s']} |")  # fmt: skip
    print(f"\nCE clean {rows[0]['ce_loss_clean']:.3f}, MLP output zeroed {rows[0]['ce_loss_with_ablation']:.3f}")


if __name__ == "__main__":
    main()
