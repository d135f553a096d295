"""Zoo models in the other stages: `--model zoo:NAME` loading, the activation store, the SAE evals, dashboards."""

import pytest
import torch

from saelab.errors import SaelabError
from saelab.models.access import load_model
from saelab.models.evals import ZOO_EVAL_SEED, lm_eval
from saelab.models.store import build_lm_source
from saelab.sae.model import SAEConfig, build_sae

torch.set_num_threads(1)
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def zoo_lm():
    return load_model("zoo:cumsum")


def test_zoo_model_loads_with_its_task_and_vocabulary(zoo_lm):
    assert zoo_lm.task.name == "cumsum" and zoo_lm.name == "zoo:cumsum"
    assert zoo_lm.special_token_ids == []
    tokens = zoo_lm.task.encode("3 1 -4 1 5")[None]
    assert zoo_lm.tokenizer.decode(tokens[0]) == "3 1 -4 1 5"
    assert zoo_lm.regular_positions(tokens).all()
    assert zoo_lm.d_hook(HOOK) == 24
    answers = zoo_lm.logits(tokens).argmax(-1)[0].tolist()  # running sums 3, 4, 0, 1, 6
    assert [zoo_lm.task.outputs[i] for i in answers] == ["positive", "positive", "zero", "positive", "positive"]
    with pytest.raises(SaelabError, match="unknown zoo task"):
        load_model("zoo:nope")


def test_store_reads_every_position_of_fresh_task_sequences_and_resumes(zoo_lm):
    store = build_lm_source(zoo_lm, None, [HOOK, "hook_embed"], 128, 64, seed=3, device="cpu", buffer_tokens=400)
    meta = store.metadata_for(HOOK)
    assert meta["model_name"] == "zoo:cumsum" and meta["prepend_bos"] is False and meta["context_length"] == 20
    first = store.next_batches(150)
    state = store.state_dict()
    after = store.next_batches(300)
    # Every row is the activation of some position of the sequences the task stream generated.
    from saelab.models.zoo.model import TaskStream

    stream = TaskStream(zoo_lm.task, seed=3)
    tokens = stream.next(20)  # buffer 0: 400 tokens / 20 positions, in one model batch (32 ≥ 20)
    acts = zoo_lm.activations(tokens, [HOOK])[HOOK].flatten(0, 1)
    assert len(acts) == 400
    distances = torch.cdist(first[HOOK][:100], acts, compute_mode="donot_use_mm_for_euclid_dist")
    assert distances.min(1).values.max() < 1e-5
    # Same token at both hooks: row j of hook_embed is the embedding of the token whose resid_post is row j.
    tokens_of_rows = tokens.flatten()[distances.argmin(1)]
    assert torch.equal(first["hook_embed"][:100], zoo_lm.model.W_E[tokens_of_rows])
    resumed = build_lm_source(zoo_lm, None, [HOOK, "hook_embed"], 128, 64, seed=3, device="cpu", buffer_tokens=400)
    resumed.load_state_dict(state)
    again = resumed.next_batches(300)
    assert torch.equal(again[HOOK], after[HOOK])
    with pytest.raises(SaelabError, match="leave out --dataset"):
        build_lm_source(zoo_lm, "somewhere.txt", [HOOK], 128, 64, 0, "cpu")


@torch.no_grad()
def slow_task_eval(lm, sae, n_sequences, fwd_hooks=None):
    """Sequence by sequence with TransformerLens hooks: CE and KL on scored positions, accuracy on judged ones.

    `fwd_hooks` {"sae": [...], "abl": [...]} replaces the splice of `sae` at HOOK (e.g. a transcoder's)."""
    task, model = lm.task, lm.model
    data = task.sample(n_sequences, ZOO_EVAL_SEED, "heldout")

    def splice(kind):
        def hook(activation, hook):
            if kind == "sae":
                return sae.decode(sae.encode(activation))
            return torch.zeros_like(activation)

        return hook

    fwd_hooks = fwd_hooks or {kind: [(HOOK, splice(kind))] for kind in ("sae", "abl")}

    ce = {"clean": [], "sae": [], "abl": []}
    kl = {"sae": [], "abl": []}
    right = {"clean": 0, "sae": 0, "abl": 0}
    judged = 0
    for b in range(n_sequences):
        tokens = data.tokens[b : b + 1]
        runs = {"clean": model(tokens)[0].double()}
        for kind in ("sae", "abl"):
            runs[kind] = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks[kind])[0].double()
        log_p = {kind: logits.log_softmax(-1) for kind, logits in runs.items()}
        for p in range(task.n_ctx):
            label = int(data.labels[b, p])
            if data.scored[b, p]:
                for kind in ce:
                    ce[kind].append(-float(log_p[kind][p, label]))
                for kind in kl:
                    clean = log_p["clean"][p]
                    kl[kind].append(
                        float(sum(clean.exp()[v] * (clean[v] - log_p[kind][p, v]) for v in range(len(clean))))
                    )
            if data.judged[b, p]:
                judged += 1
                for kind in right:
                    right[kind] += int(int(runs[kind][p].argmax()) == label)
    mean = {kind: sum(v) / len(v) for kind, v in ce.items()}
    return {
        "ce_loss_clean": mean["clean"],
        "ce_loss_with_sae": mean["sae"],
        "ce_loss_with_ablation": mean["abl"],
        "ce_loss_recovered": (mean["abl"] - mean["sae"]) / (mean["abl"] - mean["clean"]),
        "kl_div_with_sae": sum(kl["sae"]) / len(kl["sae"]),
        "kl_div_with_ablation": sum(kl["abl"]) / len(kl["abl"]),
        "accuracy_clean": right["clean"] / judged,
        "accuracy_with_sae": right["sae"] / judged,
        "accuracy_with_ablation": right["abl"] / judged,
    }


def test_sae_eval_on_a_zoo_model_matches_a_slow_computation(zoo_lm):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=24, d_sae=48, k=6), torch.Generator().manual_seed(0))
    sae.metadata = {"hook_name": HOOK, "model_name": "zoo:cumsum"}
    n_sequences = 30
    fast = lm_eval(sae, model=zoo_lm, n_tokens=n_sequences * 20).to_dict()
    slow = slow_task_eval(zoo_lm, sae, n_sequences)
    assert fast["task"] == "cumsum" and fast["predictions"] == n_sequences * 20
    for key, value in slow.items():
        assert fast[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert fast["accuracy_clean"] > 0.95 and fast["accuracy_with_ablation"] < 0.7
    assert fast["kl_div_score"] is not None and 0 < fast["kl_div_score"] <= 1


@torch.no_grad()
def test_best_matching_latent_is_the_most_correlated_one(zoo_lm):
    import numpy as np

    sae = build_sae(SAEConfig(architecture="relu", d_in=24, d_sae=32), torch.Generator().manual_seed(1))
    sae.metadata = {"hook_name": HOOK, "model_name": "zoo:cumsum"}
    report = lm_eval(sae, model=zoo_lm, n_tokens=40 * 20).to_dict()
    data = zoo_lm.task.sample(40, ZOO_EVAL_SEED, "heldout")
    acts = zoo_lm.activations(data.tokens, [HOOK])[HOOK][data.variable_mask]
    latents = sae.encode(acts).double().numpy()
    running_sum = data.variable[data.variable_mask].double().numpy()
    corr = [
        np.corrcoef(latents[:, i], running_sum)[0, 1] if latents[:, i].std() > 0 else 0.0
        for i in range(latents.shape[1])
    ]
    (match,) = report["variable_latents"]
    assert report["variable"] == "running_sum" and match["value"] == "running_sum"
    assert match["latent"] == int(np.argmax(corr))
    assert match["correlation"] == pytest.approx(max(corr), abs=1e-9)


def run_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "saelab", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_end_to_end_sae_on_a_zoo_model(tmp_path):
    out = tmp_path / "sae"
    trained = run_cli(
        "sae", "train", "--model", "zoo:cumsum", "--hook", HOOK, "--architecture", "topk", "--d-sae", "48",
        "--k", "4", "--steps", "150", "--batch-size", "512", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    evaluated = run_cli("sae", "eval", str(out), "--tokens", "20000", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    import json

    report = json.loads(evaluated.stdout)
    assert report["task"] == "cumsum" and report["predictions"] == 20000
    assert report["accuracy_clean"] > 0.99 and report["accuracy_with_ablation"] < 0.7
    assert report["ce_loss_recovered"] > 0.8 and report["accuracy_with_sae"] > 0.8
    assert report["variable_latents"][0]["correlation"] > 0.3
    text = run_cli("sae", "eval", str(out), "--tokens", "2000")
    assert "best latent for running_sum" in text.stdout
    built = run_cli("dashboard", str(out), "--features", "top:4", "--sequences", "64", "--out", str(tmp_path / "site"))
    assert built.returncode == 0, built.stderr
    from saelab.dashboard.site import read_data_script

    _, index = read_data_script(tmp_path / "site" / "data" / "index.js")
    assert index["meta"]["model"] == "zoo:cumsum" and len(index["meta"]["latents"]) >= 1
    assert index["meta"]["task"]["variable_latents"][0]["correlation"] > 0.3  # on its own 64 sequences
    refused = run_cli("dashboard", str(out), "--dataset", "x.txt", "--out", str(tmp_path / "other"))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and not (tmp_path / "other").exists()
