"""Feature dashboards: saelab against sae_vis 0.3.7 and SAEDashboard 0.8 on the same model, SAE and tokens.

Each tool runs in its own subprocess (so peak memory is its own) with the torch thread count set explicitly, on
the built-in model, an SAE at its hook, and the same [sequences, context] tokens. Reported per tool and thread
count: wall time of the dashboard computation and writing (imports done; model, SAE and tokens loaded), total wall
time of the process, peak resident memory, and output size. saelab also computes exact per-token loss effects and
overall importance, which sae_vis approximates and SAEDashboard leaves out. A last row times saelab on every
latent of the SAE (4096 by default).

sae_vis and sae-dashboard pin other versions of sae-lens/transformer-lens than saelab, so they live in their own
virtual environment:

    .venv/bin/python benchmarks/dashboard.py --setup-venv      # once: creates /tmp/benchvenv
    .venv/bin/python benchmarks/dashboard.py                   # 64 latents, 512 × 128 tokens, threads 1 and 2
    .venv/bin/python benchmarks/dashboard.py --sae DIR         # a trained SAE (default: random, ~1 % density)
    .venv/bin/python benchmarks/dashboard.py --smoke           # tiny sizes, to check that everything runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_VENV = Path("/tmp/benchvenv")
# torch stays pinned (the CPU wheel); pyarrow < 26 because transformer-lens 2.x pins numpy < 2; sae_vis imports
# frozendict and tabulate without declaring them.
COMPETITORS = ["sae-vis==0.3.7", "frozendict", "tabulate", "sae-dashboard>=0.8,<0.9", "pyarrow<26", "torch==2.13.0"]

# Loading code shared by every child: the model, SAE and tokens that `prepare` saved in the work folder.
LOAD = r"""
import json, os, resource, sys, time
args = json.loads(sys.argv[1])
import torch
torch.set_num_threads(args["threads"])
torch.set_grad_enabled(False)
from pathlib import Path
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast
work = Path(args["work"])
bos = json.loads((work / "special.json").read_text())["bos"]
tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(work / "tokenizer.json"), bos_token=bos, eos_token=bos,
                                    pad_token=bos, add_bos_token=True, clean_up_tokenization_spaces=False,
                                    name_or_path="saelab-builtin")
model_cfg = HookedTransformerConfig(**json.loads((work / "model_cfg.json").read_text()))
model = HookedTransformer(model_cfg, tokenizer=tokenizer)
model.load_state_dict(load_file(str(work / "model.safetensors")), strict=False)
model.eval()
tokens = load_file(str(work / "tokens.safetensors"))["tokens"]
hook = json.loads((work / "sae" / "cfg.json").read_text())["metadata"]["hook_name"]
features = list(range(args["features"])) if args["features"] else None
"""

REPORT = r"""
seconds = time.perf_counter() - started
out = Path(args["out"])
size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else out.stat().st_size
print("RESULT " + json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "bytes": size, **globals().get("extra", {})}))
"""

SAELAB = (
    LOAD
    + r"""
from saelab.dashboard.compute import compute_dashboard
from saelab.dashboard.site import write_site
from saelab.models.access import LanguageModel
from saelab.sae.io import load_sae
lm = LanguageModel.from_transformer_lens(model, "builtin")
sae = load_sae(work / "sae")
started = time.perf_counter()
board = compute_dashboard(lm, sae, tokens, hook, features=args["features"] or None)
write_site(board, args["out"], {"kind": "lm", "model": "builtin", "hook": hook})
print("saelab phases", json.dumps(board.meta["seconds"]), file=sys.stderr)
# Precision of importance per token: the median relative half-width of its interval over latents with density
# >= 0.5 % (and enough firings to be ranked).
import statistics
widths = [(p["importance"]["per_token"]["hi"] - p["importance"]["per_token"]["lo"]) / 2
          / abs(p["importance"]["per_token"]["mean"]) for p in board.latents
          if (p["density"] or 0) >= 0.005 and not p["importance"]["too_few"] and p["importance"]["per_token"]["mean"]]
shares = [p["importance"]["sampling_share"] for p in board.latents if (p["density"] or 0) >= 0.005
          and not p["importance"]["too_few"] and p["importance"]["sampling_share"] is not None]
extra = {"half_width": statistics.median(widths) if widths else None, "dense": len(widths),
         "sampling_share": statistics.median(shares) if shares else None,
         "gradient_r": board.meta["approximation"]["gradient"].get("pearson_r")}
"""
    + REPORT
)

SAE_VIS = (
    LOAD
    + r"""
from sae_lens import SAE, HookedSAETransformer
from sae_vis.data_config_classes import SaeVisConfig
from sae_vis.data_storing_fns import SaeVisData
sae_model = HookedSAETransformer(model_cfg, tokenizer=tokenizer)  # sae_vis splices the SAE in with SAELens hooks
sae_model.load_state_dict(load_file(str(work / "model.safetensors")), strict=False)
sae = SAE.load_from_disk(str(work / "sae"), device="cpu")
sae.cfg.hook_name = hook  # sae_vis reads the SAELens 5 fields, which SAELens 6 moved into cfg.metadata
sae.cfg.hook_layer = int(hook.split(".")[1])
cfg = SaeVisConfig(features=features, minibatch_size_tokens=64, minibatch_size_features=64)
started = time.perf_counter()
data = SaeVisData.create(sae=sae, model=sae_model.eval(), tokens=tokens, cfg=cfg)
data.save_feature_centric_vis(filename=args["out"])
"""
    + REPORT
)

SAE_DASHBOARD = (
    LOAD
    + r"""
from sae_lens import SAE
from sae_dashboard.data_writing_fns import save_feature_centric_vis
from sae_dashboard.sae_vis_data import SaeVisConfig
from sae_dashboard.sae_vis_runner import SaeVisRunner
sae = SAE.load_from_disk(str(work / "sae"), device="cpu")
cfg = SaeVisConfig(hook_point=hook, features=features, minibatch_size_tokens=64, minibatch_size_features=64,
                   device="cpu", dtype="float32", verbose=False)
started = time.perf_counter()
data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
save_feature_centric_vis(sae_vis_data=data, filename=args["out"])
"""
    + REPORT
)


def setup_venv() -> None:
    """A separate environment for the competitors (CPU torch pinned first so pip does not pull a CUDA build)."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(BENCH_VENV)], check=True)
    pip = [str(BENCH_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, *COMPETITORS], check=True)
    # A dependency pulls torchvision built for another torch; nothing here needs it, and a mismatched one breaks
    # `import transformers`.
    subprocess.run([*pip[:3], "uninstall", "-y", "-q", "torchvision"], check=False)


def prepare(work: Path, sae_dir: str | None, d_sae: int, sequences: int, context: int, smoke: bool) -> None:
    """Save the model (TransformerLens weights + config + tokenizer), the SAE and the tokens into `work`."""
    import torch
    from safetensors.torch import save_file

    from saelab.models.data import documents, iter_texts, spread_contexts

    if smoke:  # a small random model with the built-in architecture family, no trained weights needed
        import itertools

        from transformer_lens import HookedTransformer, HookedTransformerConfig

        from saelab.models.builtin import wrap_tokenizer
        from saelab.models.lm_train import train_tokenizer

        tokenizer = wrap_tokenizer(train_tokenizer(itertools.islice(iter_texts(None, "heldout"), 30), 512))
        cfg = HookedTransformerConfig(
            n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=128, d_vocab=len(tokenizer),
            act_fn="gelu", normalization_type="LN", seed=0,
        )  # fmt: skip
        model = HookedTransformer(cfg, tokenizer=tokenizer).eval()
    else:
        from saelab.models.builtin import load_builtin_model

        model = load_builtin_model()
        tokenizer = model.tokenizer
    hook = "blocks.0.hook_resid_post"
    # The raw tokenizer file: the competitors' older transformers cannot read a transformers-5 tokenizer folder.
    tokenizer.backend_tokenizer.save(str(work / "tokenizer.json"))
    (work / "special.json").write_text(json.dumps({"bos": tokenizer.bos_token}))
    # The architecture fields both TransformerLens 2 (the competitors') and 3 (saelab's) understand.
    fields = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab", "act_fn", "normalization_type",
              "positional_embedding_type", "default_prepend_bos")  # fmt: skip
    (work / "model_cfg.json").write_text(json.dumps({name: getattr(model.cfg, name) for name in fields}))
    save_file({k: v.detach().contiguous() for k, v in model.named_parameters()}, str(work / "model.safetensors"))
    tokens, _ = spread_contexts(documents(None, "heldout"), tokenizer, context, tokenizer.bos_token_id, sequences)
    save_file({"tokens": tokens}, str(work / "tokens.safetensors"))
    if sae_dir is not None:
        import shutil

        shutil.copytree(sae_dir, work / "sae")
        return
    from saelab.sae.io import save_sae
    from saelab.sae.model import SAEConfig, build_sae

    # A random ReLU SAE with encoder = decoderᵀ and a bias giving about 1 % density on these activations.
    d_model = model.cfg.d_model
    sae = build_sae(SAEConfig(architecture="relu", d_in=d_model, d_sae=d_sae), torch.Generator().manual_seed(0))
    x = model.run_with_cache(tokens[:8], names_filter=hook)[1][hook].reshape(-1, d_model)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc
        sae.b_enc.copy_(-torch.quantile(pre[:, :512].flatten(), 0.99))
    sae.metadata = {"hook_name": hook, "model_name": "builtin"}
    save_sae(sae, work / "sae")


def run_child(python: str, code: str, work: Path, out: Path, threads: int, features: int) -> dict:
    env = os.environ | {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    args = json.dumps({"work": str(work), "out": str(out), "threads": threads, "features": features})
    import time

    started = time.perf_counter()
    proc = subprocess.run([python, "-c", code, args], capture_output=True, text=True, env=env, cwd=work)
    total = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stderr[-3000:], file=sys.stderr)  # the traceback, for whoever fixes the environment
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:160]}
    return json.loads(lines[-1][len("RESULT ") :]) | {"process_seconds": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup-venv", action="store_true", help=f"create {BENCH_VENV} with the competitors")
    parser.add_argument("--sae", help="a saved SAE at blocks.0.hook_resid_post of the built-in model")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--d-sae", type=int, default=4096, help="size of the random SAE when --sae is not given")
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--smoke", action="store_true", help="tiny random model and sizes: check that it all runs")
    parser.add_argument("--skip-all-latents", action="store_true", help="skip the every-latent saelab run")
    args = parser.parse_args()
    if args.setup_venv:
        setup_venv()
        return
    if args.smoke:
        args.features, args.d_sae, args.sequences, args.context, args.threads = 8, 256, 16, 32, [1]
    bench_python = BENCH_VENV / "bin" / "python"
    tools = [("saelab", sys.executable, SAELAB, "site")]
    if bench_python.exists():
        tools += [("sae_vis 0.3.7", str(bench_python), SAE_VIS, "sae_vis.html"),
                  ("sae-dashboard 0.8", str(bench_python), SAE_DASHBOARD, "sae_dashboard.html")]  # fmt: skip
    else:
        print(f"({BENCH_VENV} missing: run with --setup-venv to compare against sae_vis and sae-dashboard)")
    with tempfile.TemporaryDirectory(prefix="saelab-bench-") as tmp:
        work = Path(tmp)
        prepare(work, args.sae, args.d_sae, args.sequences, args.context, args.smoke)
        d_sae = json.loads((work / "sae" / "cfg.json").read_text())["d_sae"]
        print(f"{args.sequences} sequences × {args.context} tokens, {args.features} of {d_sae} latents")
        print(f"{'tool':<20} {'threads':>7} {'compute s':>10} {'process s':>10} {'peak MB':>9} {'output MB':>10}  "
              "importance interval (saelab)")  # fmt: skip
        rows = [(name, python, code, out, args.features) for name, python, code, out in tools]
        if not args.skip_all_latents:
            rows.append((f"saelab, all {d_sae}", sys.executable, SAELAB, "site_all", 0))
        for name, python, code, out, features in rows:
            for threads in args.threads:
                target = work / f"{Path(out).stem}_{threads}{Path(out).suffix}"
                result = run_child(python, code, work, target, threads, features)
                if "error" in result:
                    print(f"{name:<20} {threads:>7}  failed: {result['error']}")
                    continue
                width = ""
                if result.get("half_width") is not None:
                    width = (f"  median relative half-width {result['half_width']:.1%} over {result['dense']} latents "
                             f"with density >= 0.5 % (median {result['sampling_share'] or 0:.0%} of its variance from "
                             f"sampling the exact firings); gradient vs exact r = {result['gradient_r']}")  # fmt: skip
                print(f"{name:<20} {threads:>7} {result['seconds']:>10.2f} {result['process_seconds']:>10.2f} "
                      f"{result['peak_mb']:>9.0f} {result['bytes'] / 1e6:>10.2f}{width}")  # fmt: skip


if __name__ == "__main__":
    main()
