"""Transcoders: every architecture trained from one activation to another, with and without a skip connection.

The model-level contract (shapes, the loss against the target, the fused paths against the reference, scale
folding), training from two hooks of one forward pass with resume, the SAELens 6 transcoder layout both ways, and
the spliced LM evals against a hand-made TransformerLens splice.
"""

from __future__ import annotations

import json

import pytest
import torch
from models_helpers import check_splice_metrics, mean_ce
from sae_helpers import one_thread  # noqa: F401  (autouse)

from saelab.errors import SaelabError
from saelab.sae.model import ARCHITECTURES, SAEConfig, build_sae

D_IN, D_OUT, D_SAE = 12, 7, 40


def _transcoder(architecture: str, skip: bool, dtype: str = "float32", **kw):
    """A transcoder whose weights are off their initialisation (W_skip too), so every term is non-trivial."""
    cfg = SAEConfig(architecture, D_IN, D_SAE, d_out=D_OUT, skip=skip, dtype=dtype, **kw)
    sae = build_sae(cfg, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return sae


def _data(n: int = 300, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """x and a target y that depends on x nonlinearly (an MLP-like map), so the transcoder has something to learn."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, D_IN, generator=generator, dtype=dtype)
    W = torch.randn(D_IN, D_OUT, generator=generator, dtype=dtype)
    return x, torch.relu(x @ W) - 0.3


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_outputs_the_target_width_and_its_loss_is_the_error_on_the_target(
    architecture: str, skip: bool
) -> None:
    sae = _transcoder(architecture, skip, k=3)
    x, y = _data(40)
    out = sae(x.reshape(4, 10, D_IN), target=y.reshape(4, 10, D_OUT), fast=False)
    assert out.x_hat.shape == (4, 10, D_OUT) and out.latents.shape == (4, 10, D_SAE)
    assert tuple(sae.W_dec.shape) == (D_SAE, D_OUT) and tuple(sae.b_dec.shape) == (D_OUT,)
    assert not sae.cfg.apply_b_dec_to_input  # b_dec is in the output space
    # x_hat is the whole output: decode(latents) + x W_skipᵀ, written out by hand
    latents = out.latents.reshape(40, D_SAE)
    by_hand = latents @ sae.W_dec + sae.b_dec + (x @ sae.W_skip.T if skip else 0)
    torch.testing.assert_close(out.x_hat.reshape(40, D_OUT), by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mse, (by_hand - y).pow(2).sum(1).mean(), atol=1e-5, rtol=1e-5)
    sae.eval()  # inference: encode and output reproduce it (BatchTopK becomes its JumpReLU, so compare only there)
    torch.testing.assert_close(sae.output(x, sae.encode(x)), sae(x, target=y).x_hat, atol=1e-5, rtol=1e-5)
    if skip:
        out = sae.train()(x, target=y, fast=False)
        out.loss.backward()
        assert sae.W_skip.grad is not None and sae.W_skip.grad.abs().sum() > 0


@pytest.mark.parametrize("architecture", ["relu", "topk"])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_transcoder_paths_match_the_reference_loss_and_gradients(architecture: str, skip: bool, dtype: str):
    sae = _transcoder(architecture, skip, dtype, k=5, sparsity_coefficient=0.7)
    x, y = _data(300, sae.W_enc.dtype)  # several row blocks of the fused loop
    dead = torch.rand(D_SAE, generator=torch.Generator().manual_seed(2)) < 0.5
    results = []
    for fast in (False, True):
        sae.zero_grad()
        out = sae(x, dead=dead, sparsity_scale=0.6, fast=fast, target=y)
        out.loss.backward()
        results.append((out, {name: p.grad.clone() for name, p in sae.named_parameters()}))
    (ref, ref_grads), (fast, fast_grads) = results
    assert fast.latents is None  # the fused path ran
    for name in ("loss", "mse", "sparsity", "aux", "x_hat"):
        torch.testing.assert_close(getattr(fast, name).detach(), getattr(ref, name).detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(fast.fired, ref.fired)
    assert set(fast_grads) == set(ref_grads) == set(sae.weight_names)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-5, msg=f"gradient of {name}")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_folding_input_and_output_scales_gives_the_same_latents_and_a_rescaled_output(architecture: str) -> None:
    sae = _transcoder(architecture, True, k=3).eval()
    x, _ = _data(32)
    s_in, s_out = 3.0, 0.25
    latents = sae.encode(s_in * x)
    y_hat = sae.output(s_in * x, latents)
    sae.fold_input_scale(s_in, s_out)
    torch.testing.assert_close(sae.encode(x), latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.output(x, sae.encode(x)), y_hat / s_out, atol=1e-5, rtol=1e-5)


def test_transcoder_configs_are_checked() -> None:
    with pytest.raises(SaelabError, match=r"skip \(a linear skip connection\) applies to transcoders"):
        build_sae(SAEConfig("topk", 4, 16, skip=True))
    with pytest.raises(SaelabError, match="apply_b_dec_to_input must be False"):
        build_sae(SAEConfig("topk", 4, 16, d_out=4, apply_b_dec_to_input=True))
    with pytest.raises(SaelabError, match="d_out"):
        build_sae(SAEConfig("topk", 4, 16, d_out=0))
    sae = build_sae(SAEConfig("topk", 4, 16, d_out=3, k=2))
    with pytest.raises(SaelabError, match="pass target="):
        sae(torch.randn(5, 4))
    with pytest.raises(SaelabError, match=r"target has shape \(5, 4\); expected \[..., d_out\] with d_out = 3"):
        sae(torch.randn(5, 4), target=torch.randn(5, 4))


# --- the saved format: SAELens 6's transcoder layout ------------------------------------------------------------


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens")


# saelab architecture → the SAELens architecture its transcoder is saved as (SAELens has no TopK or Gated one)
SAELENS_FORMS = {
    ("relu", False): "transcoder",
    ("relu", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
    ("batchtopk", False): "jumprelu_transcoder",
    ("matryoshka_batchtopk", True): "jumprelu_skip_transcoder",
}


@pytest.mark.parametrize(("architecture", "skip"), list(SAELENS_FORMS))
def test_saelab_transcoders_load_in_saelens_with_the_same_latents_and_outputs(
    tmp_path, monkeypatch, sae_lens, architecture: str, skip: bool
) -> None:
    from saelab.sae.io import load_sae, save_sae

    monkeypatch.chdir(tmp_path)  # SAELens may write caches next to the working directory
    ours = _transcoder(architecture, skip, k=3).eval()
    if architecture == "batchtopk":
        ours.threshold.fill_(0.2)  # a learned global threshold, as after training
    ours.metadata = {"hook_name": "blocks.0.hook_resid_mid", "hook_name_out": "blocks.0.hook_mlp_out"}
    save_sae(ours, tmp_path / "tc")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "tc")
    assert (
        type(theirs).__name__
        == {
            "transcoder": "Transcoder",
            "skip_transcoder": "SkipTranscoder",
            "jumprelu_transcoder": "JumpReLUTranscoder",
            "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder",
        }[SAELENS_FORMS[(architecture, skip)]]
    )
    assert theirs.cfg.d_out == D_OUT and theirs.cfg.metadata.hook_name_out == "blocks.0.hook_mlp_out"
    x = 2 * torch.randn(64, D_IN, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        latents = ours.encode(x)
        assert (latents > 0).any() and (latents == 0).any()  # the comparison sees both sides of the activation
        # Same float32 operations in the same order on both sides: agreement to rounding, not approximately.
        torch.testing.assert_close(theirs.encode(x), latents, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(theirs(x), ours.output(x, latents), atol=1e-5, rtol=1e-5)
    back = load_sae(tmp_path / "tc")  # and saelab reads its own file back exactly
    for name in ours.weight_names:
        assert torch.equal(getattr(back, name), getattr(ours, name)), name


def _saelens_transcoder(sae_lens, name: str):
    """A SAELens transcoder of architecture `name` with random weights (threshold too), built by SAELens itself."""
    classes = {
        "transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
        "skip_transcoder": (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig),
        "jumprelu_transcoder": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig),
        "jumprelu_skip_transcoder": (sae_lens.JumpReLUSkipTranscoder, sae_lens.JumpReLUSkipTranscoderConfig),
    }
    cls, cfg_cls = classes[name]
    torch.manual_seed(0)
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False))
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(0.3 * torch.randn_like(param))
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()
    return sae


@pytest.mark.parametrize("name", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saelens_transcoders_load_in_saelab_with_the_same_latents_and_outputs(tmp_path, monkeypatch, sae_lens, name):
    from saelab.sae.io import load_sae

    monkeypatch.chdir(tmp_path)
    theirs = _saelens_transcoder(sae_lens, name)
    theirs.save_model(tmp_path / name)
    ours = load_sae(tmp_path / name)
    assert ours.cfg.transcoder and ours.cfg.d_out == D_OUT and ours.cfg.skip == ("skip" in name)
    assert ours.cfg.architecture == ("jumprelu" if "jumprelu" in name else "relu")
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        latents = ours.encode(x)
        assert (latents > 0).any() and (latents == 0).any()
        torch.testing.assert_close(latents, theirs.encode(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours.output(x, latents), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["topk", "gated"])
def test_transcoders_without_a_saelens_form_stay_in_saelabs_layout(tmp_path, monkeypatch, sae_lens, architecture):
    """SAELens has no TopK or Gated transcoder: saelab saves its own architecture name, which SAELens refuses
    rather than misreading, and reads it back exactly."""
    from saelab.sae.io import load_sae, save_sae

    monkeypatch.chdir(tmp_path)
    ours = _transcoder(architecture, True, k=3).eval()
    save_sae(ours, tmp_path / "tc")
    cfg = (tmp_path / "tc" / "cfg.json").read_text()
    assert f'"architecture": "{architecture}_skip_transcoder"' in cfg
    with pytest.raises(KeyError, match=f"{architecture}_skip_transcoder"):
        sae_lens.SAE.load_from_disk(tmp_path / "tc")
    back = load_sae(tmp_path / "tc")
    x = torch.randn(16, D_IN)
    torch.testing.assert_close(back.output(x, back.encode(x)), ours.output(x, ours.encode(x)))


# --- training from two hooks of one forward pass -----------------------------------------------------------------

HOOK_IN, HOOK_OUT, LENGTH = "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", 32
TRAIN_CFG = dict(steps=16, batch_size=64, init_tokens=128, lr=3e-3, log_every=1)


def _store(lm, dataset, hooks=(HOOK_IN, HOOK_OUT)):
    from saelab.models.data import ContextStream, iter_texts
    from saelab.models.store import ActivationStore

    contexts = ContextStream(lambda: iter_texts(dataset), lm.tokenizer, LENGTH, lm.bos_token_id)
    return ActivationStore(lm, contexts, list(hooks), buffer_tokens=8 * LENGTH, model_batch_size=4, dataset=dataset)


def test_input_and_target_rows_are_the_same_token_of_one_forward_pass(lm, dataset) -> None:
    """resid_post = resid_mid + mlp_out holds row by row only if the three batches are the same tokens."""
    store = _store(lm, dataset, (HOOK_IN, HOOK_OUT, "blocks.0.hook_resid_post"))
    batches = store.next_batches(300)
    torch.testing.assert_close(batches[HOOK_IN] + batches[HOOK_OUT], batches["blocks.0.hook_resid_post"])


@pytest.mark.parametrize("skip", [False, True])
def test_a_transcoder_learns_the_mlp_and_is_saved_folded_to_raw_activations(lm, dataset, tmp_path, skip) -> None:
    from saelab.sae.io import load_sae
    from saelab.sae.train import SAETrainConfig, read_log, train_saes
    from saelab.stats import explained_variance

    cfg = SAEConfig("topk", 32, 128, k=8, d_out=32, skip=skip)
    train = SAETrainConfig(**{**TRAIN_CFG, "steps": 60})
    trained = train_saes(_store(lm, dataset), cfg, train, out=tmp_path / "tc", progress=False, hooks=[HOOK_IN],
                         hooks_out=[HOOK_OUT])[0]  # fmt: skip
    log = read_log(tmp_path / "tc")
    saved = load_sae(tmp_path / "tc")
    assert saved.metadata["hook_name"] == HOOK_IN and saved.metadata["hook_name_out"] == HOOK_OUT
    assert saved.saved_info["normalization_scale_out"] > 0
    # On raw activations of fresh tokens, the saved transcoder predicts the MLP's output; its EV is in line with the
    # log's (computed on normalised activations, where the scales cancel out of the EV).
    batches = _store(lm, dataset).next_batches(2000)
    x, y = batches[HOOK_IN], batches[HOOK_OUT]
    with torch.no_grad():
        ev = explained_variance(y, saved.output(x, saved.encode(x)))
        torch.testing.assert_close(saved.output(x, saved.encode(x)), trained.output(x, trained.encode(x)))
    assert ev > 0.2 and ev > log[0]["explained_variance"] + 1  # (this random tiny MLP is hard: 60 steps reach ~0.3)
    assert abs(ev - log[-1]["explained_variance"]) < 0.1


def test_a_transcoder_run_resumes_bit_exactly_and_its_identity_includes_the_output_hook(lm, dataset, tmp_path):
    from test_store_training import DiesAfter, assert_same_weights

    from saelab.sae.train import SAETrainConfig, train_saes

    cfg = SAEConfig("relu", 32, 64, d_out=32, skip=True, sparsity_coefficient=0.5)
    train = SAETrainConfig(**{**TRAIN_CFG, "checkpoint_every": 5})
    run = dict(hooks=[HOOK_IN], hooks_out=[HOOK_OUT], progress=False)
    with pytest.raises(KeyboardInterrupt):  # dies in step 12 (2 batches initialise), after the step-10 checkpoint
        train_saes(DiesAfter(_store(lm, dataset), 2 + 12), cfg, train, out=tmp_path / "run", **run)
    other = {**run, "hooks_out": ["blocks.0.hook_attn_out"]}
    with pytest.raises(SaelabError, match=r"other settings .*blocks\.0\.hook_attn_out"):
        train_saes(_store(lm, dataset, (HOOK_IN, "blocks.0.hook_attn_out")), cfg, train, out=tmp_path / "run",
                   resume=True, **other)  # fmt: skip
    no_skip = SAEConfig("relu", 32, 64, d_out=32, sparsity_coefficient=0.5)
    with pytest.raises(SaelabError, match="skip"):
        train_saes(_store(lm, dataset), no_skip, train, out=tmp_path / "run", resume=True, **run)
    resumed = train_saes(_store(lm, dataset), cfg, train, out=tmp_path / "run", resume=True, **run)[0]
    uninterrupted = train_saes(_store(lm, dataset), cfg, train, **run)[0]
    assert_same_weights(resumed, uninterrupted)


def test_sae_train_command_trains_transcoders(lm, dataset, tmp_path) -> None:
    from typer.testing import CliRunner

    from saelab.cli import app
    from saelab.models.cache import write_activation_cache
    from saelab.sae.io import load_sae

    cache = write_activation_cache(_store(lm, dataset), 16384 + 4 * 64, tmp_path / "cache")  # init + 4 steps
    args = ["sae", "train", "--source", f"cache:{cache}", "--d-sae", "64", "--steps", "4", "--batch-size", "64"]
    args += ["--quiet", "--hook-in", HOOK_IN, "--hook-out", HOOK_OUT, "--k", "2,4", "--skip"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")], catch_exceptions=False)
    assert "saved 2 transcoders" in result.output
    for k in (2, 4):
        tc = load_sae(tmp_path / "run" / f"topk_k{k}")
        assert tc.cfg.transcoder and tc.cfg.skip and tc.cfg.k == k and tc.metadata["hook_name_out"] == HOOK_OUT
    info = CliRunner().invoke(app, ["sae", "info", str(tmp_path / "run" / "topk_k2"), "--json"], catch_exceptions=False)
    shown = json.loads(info.output)
    assert shown["d_out"] == 32 and shown["skip"] is True and shown["hook_name_out"] == HOOK_OUT
    # Evaluated on the cache itself (`sae eval --source cache:DIR`): the metrics of its prediction of HOOK_OUT
    from saelab.models.cache import CachedActivations
    from saelab.sae.evaluate import evaluate_saved

    report = evaluate_saved(tmp_path / "run" / "topk_k2", f"cache:{cache}", tokens=600, batch_size=200)
    rows = CachedActivations(cache).next_batches(600)
    x, y = rows[HOOK_IN], rows[HOOK_OUT]
    tc = load_sae(tmp_path / "run" / "topk_k2")
    with torch.no_grad():
        y_hat = tc.output(x, tc.encode(x))
    assert report["tokens"] == 600 and report["l0"] <= 2
    assert report["explained_variance"] == pytest.approx(
        1 - ((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item(), rel=1e-5
    )
    for bad, message in (
        (["--source", f"cache:{cache}", "--skip", "--hook", HOOK_IN], "--skip gives a transcoder"),
        (["--source", f"cache:{cache}", "--hook-out", HOOK_OUT], "needs its input hook too"),
        (["--source", f"cache:{cache}", "--hook-in", HOOK_IN, "--hook-out", HOOK_OUT, "--resample-every", "2"],
         "transcoders revive dead latents with AuxK"),
    ):  # fmt: skip
        failed = CliRunner().invoke(app, ["sae", "train", "--out", str(tmp_path / "bad"), "--quiet", *bad])
        assert failed.exit_code != 0 and message in str(failed.exception), failed.output


# --- LM evals: the transcoder spliced in place of the MLP -------------------------------------------------------


def test_lm_evals_of_a_transcoder_match_a_splice_by_hand(lm, dataset) -> None:
    """Every figure recomputed with TransformerLens's run_with_hooks, the transcoder written out by hand."""
    import math

    from saelab.models.data import documents, spread_contexts
    from saelab.models.evals import lm_eval

    tc = build_sae(SAEConfig("relu", 32, 96, d_out=32, skip=True), torch.Generator().manual_seed(0)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in tc.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
        tc.b_enc.sub_(0.4)  # some latents fire on some tokens only, some on none: L0 and dead latents are non-trivial
    tc.metadata = {"hook_name": HOOK_IN, "hook_name_out": HOOK_OUT}
    n_tokens = 600
    metrics = lm_eval(tc, model=lm, dataset=dataset, n_tokens=n_tokens, context_length=LENGTH, model_batch_size=5)

    tokens, _ = spread_contexts(documents(dataset, "heldout"), lm.tokenizer, LENGTH, 0,
                                math.ceil(n_tokens / (LENGTH - 1)), seed=0)  # fmt: skip
    keep = (tokens != 0)[..., None]  # BOS (id 0, also padding) keeps the MLP's own output
    W_enc, b_enc, W_dec, b_dec, W_skip = (
        getattr(tc, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip")
    )
    read = {}

    def transcoder(x):
        return torch.relu(x @ W_enc + b_enc) @ W_dec + b_dec + x @ W_skip.T

    def capture(x, hook):
        read["x"] = x

    splice = {
        "tc": [(HOOK_IN, capture), (HOOK_OUT, lambda y, hook: torch.where(keep, transcoder(read["x"]), y))],
        "abl": [(HOOK_OUT, lambda y, hook: torch.where(keep, torch.zeros_like(y), y))],
    }
    model = lm.model
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(tokens, names_filter=[HOOK_IN, HOOK_OUT])
        logits = {name: model.run_with_hooks(tokens, fwd_hooks=hooks) for name, hooks in splice.items()}
    counted = (tokens[:, :-1] != 0) & (tokens[:, 1:] != 0)
    ce_clean, ce_tc, ce_abl = (mean_ce(run, tokens, counted) for run in (clean_logits, logits["tc"], logits["abl"]))
    assert ce_tc != pytest.approx(ce_clean, rel=1e-3) and ce_abl != pytest.approx(ce_clean, rel=1e-3)  # not vacuous
    check_splice_metrics(metrics, tokens, clean_logits, logits["tc"], logits["abl"])

    regular = tokens != 0
    x, y = cache[HOOK_IN][regular], cache[HOOK_OUT][regular]  # the clean run's MLP input and output
    y_hat = transcoder(x)
    fires = torch.relu(x @ W_enc + b_enc) > 0
    assert metrics.reconstruction["tokens"] == len(y)
    assert metrics.explained_variance == pytest.approx(
        1 - ((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item(), rel=1e-4
    )
    assert metrics.mse == pytest.approx((y - y_hat).pow(2).sum(-1).mean().item(), rel=1e-5)
    assert metrics.l0 == pytest.approx(fires.sum(1).double().mean().item(), rel=1e-9)
    dead = (~fires.any(0)).double().mean().item()
    assert 0 < dead < 1 and metrics.reconstruction["dead_fraction"] == pytest.approx(dead, rel=1e-9)


def test_a_transcoder_trains_on_a_zoo_models_mlp_and_its_task_evals_match_a_splice_by_hand(tmp_path) -> None:
    from test_zoo_integration import slow_task_eval

    from saelab.models.access import load_model
    from saelab.models.evals import lm_eval
    from saelab.models.store import build_lm_source
    from saelab.sae.train import SAETrainConfig, train_saes

    zoo = load_model("zoo:cumsum")  # one layer, no normalisation: hook_resid_mid is the MLP's input
    source = build_lm_source(zoo, None, [HOOK_IN, HOOK_OUT], 20, 256, 0, "cpu")
    cfg = SAEConfig("topk", 24, 48, k=4, d_out=24, skip=True)
    train = SAETrainConfig(steps=40, batch_size=256, init_tokens=512, log_every=100)
    tc = train_saes(source, cfg, train, progress=False, hooks=[HOOK_IN], hooks_out=[HOOK_OUT])[0]
    assert tc.metadata["hook_name_out"] == HOOK_OUT
    n_sequences = 30
    fast = lm_eval(tc, model=zoo, n_tokens=n_sequences * 20).to_dict()
    read = {}

    def capture(x, hook):
        read["x"] = x

    fwd_hooks = {
        "sae": [(HOOK_IN, capture), (HOOK_OUT, lambda y, hook: tc.output(read["x"], tc.encode(read["x"])))],
        "abl": [(HOOK_OUT, lambda y, hook: torch.zeros_like(y))],
    }
    slow = slow_task_eval(zoo, tc, n_sequences, fwd_hooks)
    for key, value in slow.items():
        assert fast[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # It learned the MLP's output (EV ≈ 0.98 here), yet the task's loss is worse than with no MLP at all: cumsum's MLP
    # must tell an exact zero sum apart, and small errors in its output flip those answers.
    assert fast["explained_variance"] > 0.9


@pytest.mark.slow
def test_two_processes_train_the_same_transcoder_as_one(lm, dataset, tmp_path) -> None:
    """torchrun with gloo: each rank reads its half of every cached batch, at both hooks."""
    from test_sae_distributed import saelab

    from saelab.models.cache import write_activation_cache
    from saelab.sae.io import load_sae

    cache = write_activation_cache(_store(lm, dataset), 16384 + 10 * 128, tmp_path / "cache")
    args = ["sae", "train", "--source", f"cache:{cache}", "--hook-in", HOOK_IN, "--hook-out", HOOK_OUT, "--skip"]
    args += ["--d-sae", "64", "--k", "4", "--steps", "10", "--batch-size", "128", "--quiet"]
    for processes in (1, 2):
        result = saelab([*args, "--out", str(tmp_path / f"p{processes}")], processes)
        assert result.returncode == 0 and result.stdout.count("saved 1 transcoder") == 1, result.stderr[-3000:]
    one, two = load_sae(tmp_path / "p1"), load_sae(tmp_path / "p2")
    assert two.cfg.skip and two.metadata["hook_name_out"] == HOOK_OUT
    for name, tensor in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], tensor, atol=2e-5, rtol=1e-4, msg=name)


def test_transcoder_evals_agree_between_transformer_lens_and_hugging_face(tokenizer, dataset, tmp_path) -> None:
    """On a Hugging Face GPT-2, hook_resid_mid is ln_2's input and hook_mlp_out the MLP's output: the same splice."""
    from models_helpers import save_gpt2

    from saelab.models.access import load_model
    from saelab.models.evals import lm_eval

    folder = save_gpt2(tmp_path / "gpt2", tokenizer)
    tc = build_sae(SAEConfig("relu", 32, 64, d_out=32, skip=True), torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        tc.W_skip.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    tc.metadata = {"hook_name": "blocks.1.hook_resid_mid", "hook_name_out": "blocks.1.hook_mlp_out"}
    runs = [
        lm_eval(tc, model=load_model(str(folder), backend=backend), dataset=dataset, n_tokens=300, context_length=32)
        for backend in ("hf", "transformer_lens")
    ]
    assert abs(runs[0].ce_loss_with_sae - runs[0].ce_loss_clean) > 1e-3  # the splice changes the model's output
    for key in ("ce_loss_clean", "ce_loss_with_sae", "ce_loss_with_ablation", "kl_div_with_sae", "explained_variance"):
        assert getattr(runs[0], key) == pytest.approx(getattr(runs[1], key), rel=1e-4), key
