"""End-to-end SAE training on a language model: saelab against SAELens on the same model, tokens and SAE.

Both tools turn the same token contexts (BOS + 127 tokens of the built-in corpus's training files, in the seeded
document order every saelab stage reads) into
activations at `blocks.0.hook_resid_post` of the built-in model and train the same TopK SAE (d_sae = 16 × d_model,
k = 32, batch 4096 tokens, activations scaled to E‖x‖ = √d_in) on the CPU, each in its own subprocess with the
torch thread count set explicitly. Each tool trains with its own defaults (initialisation, learning rate and
schedule) unless `--lr` sets both tools' learning rate; `--lrs` sweeps it, to compare the tools at their best.
saelab runs `build_lm_source` + `train_saes`; SAELens runs
`LanguageModelSAETrainingRunner` with the model and a pre-tokenised dataset passed in (`override_model`,
`override_dataset`; wandb off), so its time leaves tokenisation out while saelab's includes it.

Reported per tool and thread count: seconds and tokens/s end to end (activation generation + SAE training; model
loading excluded), and, at the same token budget, CE loss recovered, explained variance and L0 of the trained SAE,
all three measured by `saelab.models.evals.lm_eval` on held-out files.

    .venv/bin/python benchmarks/lm_train.py                      # 2^21 tokens, threads 1 and 2, defaults
    .venv/bin/python benchmarks/lm_train.py --tokens 524288 --threads 2 --lrs 3e-4,1e-3,3e-3   # an lr sweep
    .venv/bin/python benchmarks/lm_train.py --smoke              # tiny sizes, to check that everything runs
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

HOOK = "blocks.0.hook_resid_post"
CONTEXT = 128


def run_child(tool: str, threads: int, lr: float | None, args: argparse.Namespace) -> dict:
    """Train with one tool in a fresh process (lr None: the tool's default); its last output line is a JSON result."""
    settings = {**vars(args), "tool": tool, "threads": threads, "lr": lr}
    command = [sys.executable, __file__, "--child", json.dumps(settings)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        sys.exit(f"{tool} with {threads} threads failed:\n{done.stderr[-3000:]}")
    return json.loads(results[-1][len("RESULT ") :])


def child(settings: dict) -> None:
    import torch

    torch.set_num_threads(settings["threads"])
    from saelab.models.access import load_model
    from saelab.models.evals import lm_eval

    lm = load_model(settings["model"], "cpu", backend="transformer_lens")
    d_in, batch, tokens = lm.d_hook(HOOK), settings["batch_size"], settings["tokens"]
    d_sae, k, lr, norm_tokens = settings["expansion"] * d_in, settings["k"], settings["lr"], settings["norm_tokens"]
    train = saelab_train if settings["tool"] == "saelab" else saelens_train
    started = time.perf_counter()
    sae = train(lm, d_in, d_sae, k, lr, batch, tokens, norm_tokens, settings["buffer_tokens"])
    seconds = time.perf_counter() - started
    metrics = lm_eval(sae, model=lm, n_tokens=settings["eval_tokens"], context_length=CONTEXT).to_dict()
    result = {
        "tool": settings["tool"],
        "threads": settings["threads"],
        "lr": lr if lr is not None else default_lr(settings["tool"]),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }
    result |= {key: metrics[key] for key in ("ce_loss_recovered", "explained_variance", "l0", "ce_loss_clean")}
    print("RESULT " + json.dumps(result))


def default_lr(tool: str) -> float:
    if tool == "saelab":
        from saelab.sae.model import SAE_CLASSES

        return SAE_CLASSES["topk"].default_lr
    from sae_lens import LanguageModelSAERunnerConfig

    return LanguageModelSAERunnerConfig.__dataclass_fields__["lr"].default


def saelab_train(lm, d_in, d_sae, k, lr, batch, tokens, norm_tokens, buffer_tokens):
    from saelab.models.store import build_lm_source
    from saelab.sae.model import SAEConfig
    from saelab.sae.train import SAETrainConfig, train_saes

    store = build_lm_source(lm, None, HOOK, CONTEXT, batch, 0, "cpu", buffer_tokens=buffer_tokens)
    sae_cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k)
    cfg = SAETrainConfig(steps=tokens // batch, batch_size=batch, init_tokens=norm_tokens)
    if lr is not None:
        cfg.lr = lr
    return train_saes(store, sae_cfg, cfg, progress=False)[0]


def saelens_train(lm, d_in, d_sae, k, lr, batch, tokens, norm_tokens, buffer_tokens):
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
    from torch import nn

    from saelab.models.data import ContextStream, documents

    n_contexts = math.ceil(2 * tokens / (CONTEXT - 1))  # ample: SAELens refills its buffer ahead of training
    lr_setting = {} if lr is None else {"lr": lr}
    # The contexts saelab's store reads (seed 0: the same shuffled document order), so both tools see the same tokens.
    contexts = ContextStream(documents(None, "train"), lm.tokenizer, CONTEXT, lm.bos_token_id, seed=0).next(n_contexts)
    dataset = datasets.Dataset.from_dict({"input_ids": contexts.tolist()})
    store_batch = 32
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, normalize_activations="expected_average_only_in"),
        model_name="saelab-builtin",
        hook_name=HOOK,
        dataset_path="pretokenised",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=CONTEXT,
        prepend_bos=True,
        exclude_special_tokens=True,
        training_tokens=tokens,
        train_batch_size_tokens=batch,
        store_batch_size_prompts=store_batch,
        # Its mixing buffer holds n_batches_in_buffer × context_size activations: the default (20) is below one
        # batch at context 128 and crashes, so size it like saelab's.
        n_batches_in_buffer=math.ceil(buffer_tokens / CONTEXT),
        n_batches_for_norm_estimate=max(1, norm_tokens // batch),
        **lr_setting,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        save_final_checkpoint=False,
        output_path=None,
        verbose=False,
    )
    sae = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=lm.model).run()

    class Spliceable(nn.Module):
        """SAELens's SAE with the `metadata` dict that saelab's LM eval reads its hook from."""

        def __init__(self) -> None:
            super().__init__()
            self.sae, self.cfg, self.metadata = sae, sae.cfg, {"hook_name": HOOK}

        def encode(self, x):
            return self.sae.encode(x)

        def decode(self, latents):
            return self.sae.decode(latents)

    return Spliceable().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="a model name or folder (default: the built-in model)")
    parser.add_argument("--tokens", type=int, default=2**21, help="training tokens for each tool")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--expansion", type=int, default=16, help="d_sae / d_model")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="both tools' learning rate (default: each its own)")
    parser.add_argument("--lrs", default=None, help="comma-separated learning rates to sweep (both tools at each)")
    parser.add_argument("--norm-tokens", type=int, default=16384, help="tokens that estimate the input scale")
    parser.add_argument("--buffer-tokens", type=int, default=2**17, help="activations in each tool's mixing buffer")
    parser.add_argument("--eval-tokens", type=int, default=2**15)
    parser.add_argument("--threads", default="1,2", help="torch thread counts to run, comma-separated")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that everything runs")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.smoke:
        args.tokens, args.batch_size, args.expansion, args.k = 2048, 512, 2, 8
        args.norm_tokens, args.buffer_tokens, args.eval_tokens, args.threads = 1024, 4096, 512, "2"
    print(f"{args.tokens} tokens, batch {args.batch_size}, TopK k={args.k}, d_sae = {args.expansion} × d_model, {HOOK}")
    print(f"{'tool':8} {'threads':>7} {'lr':>8} {'seconds':>9} {'tokens/s':>9} {'CE rec.':>8} {'EV':>7} {'L0':>6}")
    lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else [args.lr]
    for threads in [int(t) for t in args.threads.split(",")]:
        for lr in lrs:
            rows = [run_child(tool, threads, lr, args) for tool in ("saelab", "saelens")]
            for r in rows:
                print(
                    f"{r['tool']:8} {r['threads']:>7} {r['lr']:>8.2g} {r['seconds']:>9.1f} {r['tokens_per_s']:>9.0f} "
                    f"{r['ce_loss_recovered']:>8.3f} {r['explained_variance']:>7.3f} {r['l0']:>6.1f}",
                    flush=True,
                )
            speed = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
            print(f"  saelab / SAELens speed at {threads} thread(s): {speed:.2f}×", flush=True)


if __name__ == "__main__":
    main()
