"""Dashboard computation, site files, exports and server, checked against independent brute-force computations on
tiny real models (the browser tests live in test_dashboard_browser.py)."""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from dashboard_helpers import (
    ADVERSARIAL,
    HOOK,
    XSS,
    TinySAE,
    brute_acts,
    brute_ce,
    brute_dce,
    brute_direct,
    brute_final,
    brute_joint_total,
    close,
    counted,
    make_model,
    make_tokenizer,
    make_tokens,
    one_thread,  # noqa: F401  (autouse)
)
from transformer_lens import HookedTransformer

from saelab.dashboard.cli import parse_features
from saelab.dashboard.compute import (
    DashboardConfig,
    Top,
    compute_dashboard,
    eligible_positions,
    rank_latents,
    select_latents,
)
from saelab.dashboard.effects import Downstream, reference_loss_effects
from saelab.dashboard.export import export_html, export_neuronpedia
from saelab.dashboard.importance import estimate_importance, sampling_variance
from saelab.dashboard.live import PromptAnalyzer
from saelab.dashboard.server import CSP, make_server
from saelab.dashboard.site import read_data_script, safe_json, write_site
from saelab.dashboard.stats import non_overlapping
from saelab.dashboard.text import token_label, token_strings
from saelab.errors import SaelabError


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return make_model(tok)


@pytest.fixture(scope="module")
def tokens(tok):
    return make_tokens(tok, n_seq=12, length=24)


@pytest.fixture(scope="module")
def sae():
    return TinySAE(32, 12, HOOK)


@pytest.fixture(scope="module")
def board(lm, sae, tokens):
    # exact_firings above every pool: every eligible firing is computed exactly, so brute force can redo it.
    cfg = DashboardConfig(exact_firings=10_000, top_windows=3, windows_per_interval=1, context_before=5)
    return compute_dashboard(lm, sae, tokens, HOOK, cfg=cfg)


@pytest.fixture(scope="module")
def site(board, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "site"
    write_site(board, out, {"kind": "lm", "model": "tiny", "hook": HOOK})
    return out


# ---------------------------------------------------------------------------------------- text


def test_token_strings_join_to_the_decoded_text_and_keep_characters_whole(tok):
    for text in ADVERSARIAL:
        ids = tok.encode(text, add_special_tokens=False)
        pieces = token_strings(tok, ids)
        assert len(pieces) == len(ids)
        assert "".join(pieces) == tok.decode(ids) == text
        for ch in "ï中😀€\u202e":
            if ch in text:  # each multi-byte character shows whole, on exactly one token
                assert sum(ch in p for p in pieces) == text.count(ch)
    euro = tok.encode("€", add_special_tokens=False)
    assert len(euro) == 3 and token_strings(tok, euro) == ["", "", "€"]
    assert token_strings(tok, euro[:1] + tok.encode("a", add_special_tokens=False)) == ["\ufffd", "a"]
    assert token_label(tok, euro[0]) == "\\xe2"


# ---------------------------------------------------------------------------------------- loss effects


@pytest.mark.parametrize(
    ("normalization", "positional", "hook"),
    [
        ("LN", "standard", "blocks.0.hook_resid_pre"),
        ("LN", "standard", "blocks.0.attn.hook_z"),
        ("LN", "standard", "blocks.1.hook_resid_post"),
        ("RMS", "rotary", "blocks.0.hook_resid_post"),
        ("RMS", "rotary", "blocks.0.hook_mlp_out"),
        ("RMS", "rotary", "blocks.1.hook_resid_mid"),
        ("LN", "rotary", "blocks.0.mlp.hook_post"),
    ],
)
def test_fast_exact_loss_effects_match_reference_and_brute_force(tok, tokens, normalization, positional, hook):
    lm = make_model(tok, normalization, positional)
    sae = TinySAE(lm.d_hook(hook), 16, hook)
    engine = Downstream(lm, hook)
    run = engine.clean(tokens[:3])
    acts = sae.encode(run.x_hook).detach()
    seq, pos, lat = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 9, 4, 22, 13]), torch.tensor([0, 3, 5, 7, 9])
    acts[seq, pos, lat] = acts[seq, pos, lat].clamp(min=0.7)  # make sure each pair has a contribution to remove
    delta = acts[seq, pos, lat][:, None] * sae.W_dec[lat].detach()
    fast, _ = engine.loss_effects(run, seq, pos, delta)
    reference = reference_loss_effects(lm, hook, tokens[:3], seq, pos, delta)
    assert torch.allclose(fast, reference, atol=2e-5, rtol=1e-4)
    # Starting from cached residuals (the dashboard's second pass) gives the same numbers.
    from_cache, _ = engine.loss_effects(engine.clean(tokens[:3], run.resid_start), seq, pos, delta)
    assert torch.allclose(from_cache, fast, atol=1e-5)
    assert fast.abs().max() > 1e-3  # the check is not vacuous
    for i in (0, 3):
        row, p = tokens[seq[i]], int(pos[i])
        brute = brute_ce(lm, row, p, hook, delta[i]) - brute_ce(lm, row, p)
        assert close(fast[i].item(), brute)


def test_direct_path_matches_brute_force_and_needs_a_linear_hook(lm, sae, tokens):
    engine = Downstream(lm, HOOK)
    run = engine.clean(tokens[:2])
    acts = sae.encode(run.x_hook).detach()
    seq, pos, lat = torch.tensor([0, 1, 1]), torch.tensor([3, 7, 20]), torch.tensor([1, 2, 3])
    acts[seq, pos, lat] = 1.0
    delta = acts[seq, pos, lat][:, None] * sae.W_dec[lat].detach()
    _, clean = engine.loss_effects(run, seq, pos, delta)
    targets = tokens[seq, pos + 1]
    direct, normed = engine.direct_effects(clean, targets, engine.to_residual(delta))
    for i in range(3):
        row, p = tokens[seq[i]], int(pos[i])
        x = brute_final(lm, row)[p]
        assert torch.allclose(clean.final[i], x, atol=1e-5)
        logits = [lm.model.unembed(lm.model.ln_final(v[None, None]))[0, 0].double() for v in (x - delta[i], x)]
        ce = [(torch.logsumexp(lg, 0) - lg[row[p + 1]]).item() for lg in logits]
        assert close(direct[i].item(), ce[0] - ce[1])
        expected = lm.model.ln_final(x[None]) - lm.model.ln_final((x - delta[i])[None])
        assert torch.allclose(normed[i], expected[0], atol=1e-5)
    assert Downstream(lm, "blocks.0.attn.hook_q").to_residual(torch.zeros(1, 32)) is None


# ---------------------------------------------------------------------------------------- dashboard values


def test_statistics_match_brute_force(board, lm, sae, tokens):
    acts = torch.stack([brute_acts(lm, sae, row) for row in tokens])  # [S, T, d_sae]
    valid = tokens != lm.bos_token_id
    for page in board.latents:
        j = page["id"]
        a = acts[..., j][valid]
        assert page["count"] == int((a > 0).sum())
        assert close(page["density"], (a > 0).double().mean().item(), 1e-4)
        assert close(page["max"], a.max().item(), 1e-4)
        firing = a[a > 0].double()
        assert close(page["mean"], firing.mean().item(), 1e-4)
        ordered = firing.sort().values
        for q, value in page["quantiles"]:  # the ⌈qn⌉-th smallest activation itself, not a histogram bin
            assert close(value, ordered[math.ceil(q * len(ordered)) - 1].item(), 1e-4)  # pages keep 5 digits
        assert sum(page["hist"]["counts"]) == page["count"]
        top = page["windows"]["top"]
        assert close(top[0]["acts"][top[0]["center"]], page["max"], 1e-4)
        centres = [(w["seq"], w["start"] + w["center"]) for w in top]
        for (s1, p1), (s2, p2) in itertools.pairwise(centres):
            assert s1 != s2 or abs(p1 - p2) >= 10  # windows of 5 + 4 + 1 tokens never overlap
        sampled = [(w["seq"], w["start"] + w["center"]) for iv in page["windows"]["intervals"] for w in iv["windows"]]
        for s1, p1 in sampled:  # nor does a quantile-interval window overlap a top window: each shows once
            assert all(s1 != s2 or abs(p1 - p2) >= 10 for s2, p2 in centres)
        assert [w["acts"][w["center"]] for w in top] == sorted((w["acts"][w["center"]] for w in top), reverse=True)


def test_page_values_match_brute_force(board, lm, sae, tokens):
    """Activations, exact and direct ΔCE, importance and logit effects, recomputed independently per position."""
    elig = eligible_positions(tokens != lm.bos_token_id)
    checked = 0
    all_acts = torch.stack([brute_acts(lm, sae, row) for row in tokens])
    for page in board.latents[:3]:
        j = page["id"]
        windows = page["windows"]["top"] + [w for iv in page["windows"]["intervals"] for w in iv["windows"]]
        for window in windows[:2]:
            row = tokens[window["seq"]]
            acts = all_acts[window["seq"], :, j]
            for i, (a, loss, direct) in enumerate(zip(window["acts"], window["loss"], window["direct"], strict=True)):
                p = window["start"] + i
                assert close(a, acts[p].item(), 1e-4)
                assert (loss is None) == (not (acts[p] > 0 and elig[window["seq"], p]))
                if loss is not None:
                    assert close(loss, brute_dce(lm, sae, row, p, j), 1e-3)
                    assert close(direct, brute_direct(lm, sae, row, p, j), 1e-3)
                    checked += 1
        # Logit effects use every eligible firing here (exact_firings is above every latent's count).
        acts = all_acts[..., j]
        s, p = ((acts > 0) & elig).nonzero(as_tuple=True)
        assert page["logits"]["positions"] == len(s)
        # Logit effects: mean exact change of the normed final residual, times W_U.
        change = torch.zeros(lm.model.cfg.d_model)
        for a_seq, a_pos in zip(s.tolist(), p.tolist(), strict=True):
            x = brute_final(lm, tokens[a_seq])[a_pos]
            d = acts[a_seq, a_pos] * sae.W_dec[j].detach()
            change += (lm.model.ln_final(x[None]) - lm.model.ln_final((x - d)[None]))[0]
        logits = (change / len(s)) @ lm.model.W_U.detach()
        top_v = logits.topk(len(page["logits"]["top"])).values
        assert np.allclose([v for _, v in page["logits"]["top"]], top_v.numpy(), rtol=1e-3, atol=1e-4)
        assert close(page["logits"]["bottom"][0][1], logits.min().item(), 1e-3)
    assert checked >= 4
    errors = board.meta["approximation"]["direct_path"]
    assert errors["positions"] > 0 and errors["mean_abs_error"] >= 0 and -1 <= errors["pearson_r"] <= 1


def test_neighbours_and_correlations_match_brute_force(board, lm, sae, tokens):
    W = sae.W_dec.detach()
    unit = W / W.norm(dim=1, keepdim=True)
    acts = torch.stack([brute_acts(lm, sae, row) for row in tokens])[tokens != lm.bos_token_id]  # [N, d_sae]
    corr = np.corrcoef(acts.T.double().numpy())
    for page in board.latents:
        j = page["id"]
        cos = (unit @ unit[j]).numpy()
        cos[j] = -np.inf
        assert [i for i, _ in page["neighbours"]] == list(np.argsort(-cos)[: len(page["neighbours"])])
        for i, r in page["correlated"]:
            assert abs(r - corr[j, i]) < 1e-3
        c = corr[j].copy()
        c[j] = -np.inf
        assert page["correlated"][0][0] == int(np.nanargmax(c))


def _simulated_contexts(g: torch.Generator, K: int, mean: float) -> tuple:
    """K contexts of 64 tokens; a latent fires Poisson(3) times in each, more in some (clustered), with skewed
    total effects around `mean` that are correlated within a context; the cheap estimate is the exact value plus
    noise and a bias (so only the exact correction makes the estimator unbiased)."""
    counts = torch.poisson(torch.full((K,), 3.0) * torch.rand(K, generator=g).mul(2), generator=g).long()
    context = torch.repeat_interleave(torch.arange(K), counts)
    shift = torch.randn(K, generator=g)[context] * 0.5
    exact = mean + shift + (torch.distributions.Exponential(1.0).sample((len(context),)) - 1.0)
    estimate = 0.8 * exact + 0.1 + 0.3 * torch.randn(len(context), generator=g)
    return context, exact.double(), estimate.double()


def _interval(context, exact, estimate, K: int, m: int, g: torch.Generator):
    """estimate_importance on one latent whose firings are `context` [N], with m exact values on a uniform sample."""
    count = torch.bincount(context, minlength=K)[:, None]
    sums = torch.zeros(K, 1, dtype=torch.float64).index_add_(0, context, estimate[:, None])
    sample = torch.randperm(len(context), generator=g)[:m]
    return estimate_importance(
        sums, count, torch.full((K,), 64), context[sample], torch.zeros(len(sample), dtype=torch.long),
        exact[sample], estimate[sample],
    )  # fmt: skip


def test_importance_intervals_cover_the_data_mean_at_their_level():
    """Coverage by simulation: each run draws new contexts from a population whose mean total ΔCE per firing is
    known (0.3), and the 95 % interval must cover it in at least 90 % of 400 runs, both with every firing exact and
    with 32 exact firings correcting the cheap estimate. Per token the mean is 0.3 × 3 firings / 64 tokens."""
    g = torch.Generator().manual_seed(0)
    K, mean = 60, 0.3
    covered = {"exact firing": 0, "sampled firing": 0, "sampled token": 0}
    runs = 400
    for _ in range(runs):
        context, exact, estimate = _simulated_contexts(g, K, mean)
        full = _interval(context, exact, estimate, K, len(context), g)
        part = _interval(context, exact, estimate, K, 32, g)
        assert full.exact[0] == full.firings[0] and part.exact[0] == 32
        for key, target, value, half in (
            ("exact firing", mean, full.per_firing, full.per_firing_half),
            ("sampled firing", mean, part.per_firing, part.per_firing_half),
            ("sampled token", mean * 3 / 64, part.per_token, part.per_token_half),
        ):
            covered[key] += abs(value[0].item() - target) <= half[0].item()
    for key, n in covered.items():
        assert n / runs >= 0.90, (key, n / runs)
        assert n / runs <= 0.99, (key, n / runs)  # and the interval is not uselessly wide


def test_sampling_variance_is_what_redrawing_the_exact_firings_adds():
    """The variance the subsampling adds, N² (1 − m/N) s²_d / m, checked by simulation: one fixed set of scanned
    firings, 4000 redraws of a third of them as the exact ones (so that leaving out the finite-population factor
    1 − m/N would miss by half); the variance of the estimated Σ total ΔCE across redraws must match the mean stated
    variance within 8 % (its Monte Carlo error is about 2 %). With every firing exact the share is 0; otherwise it
    lies in (0, 1]."""
    g = torch.Generator().manual_seed(2)
    context, exact, estimate = _simulated_contexts(g, 60, 0.3)
    N = len(context)
    m = N // 3
    totals, stated = [], []
    for _ in range(4000):
        pick = torch.randperm(N, generator=g)[:m]
        d = exact[pick] - estimate[pick]
        totals.append((estimate.sum() + N / m * d.sum()).item())
        stated.append(sampling_variance(d, torch.zeros(m, dtype=torch.long), torch.tensor([m]), torch.tensor([N]))[0])
    observed = torch.tensor(totals, dtype=torch.float64).var().item()
    assert abs(torch.stack(stated).mean().item() - observed) <= 0.08 * observed
    full = _interval(context, exact, estimate, 60, N, g)
    part = _interval(context, exact, estimate, 60, m, g)
    assert full.sampling_share[0].item() == 0.0 and 0 < part.sampling_share[0].item() <= 1


def test_importance_with_every_firing_exact_is_their_plain_mean_and_flags_too_few():
    g = torch.Generator().manual_seed(1)
    context, exact, estimate = _simulated_contexts(g, 12, 0.3)
    imp = _interval(context, exact, estimate, 12, len(context), g)
    assert close(imp.per_firing[0].item(), exact.mean().item(), 1e-9) and imp.method(0) == "exact"
    assert close(imp.per_token[0].item(), exact.sum().item() / (12 * 64), 1e-9)
    few = _interval(context[:19], exact[:19], estimate[:19], 12, 19, g)
    assert len(context) >= 20 and int(imp.contexts[0]) >= 5 and not bool(imp.too_few[0])
    assert int(few.firings[0]) == 19 and bool(few.too_few[0])


def test_non_overlapping_keeps_the_best_window_of_each_clash():
    # Candidates (value, flat index) for one latent in sequences of length 100, window 10.
    values = torch.tensor([[9.0], [8.0], [7.0], [6.0], [0.0]])
    index = torch.tensor([[50], [55], [120], [59], [7]])  # 55 and 59 clash with 50; 120 is in sequence 1
    kept_v, kept_i = non_overlapping(values, index, T=100, window=10, k=3)
    assert kept_v[:, 0].tolist() == [9.0, 7.0, 0.0] and kept_i[:, 0].tolist() == [50, 120, -1]


def test_choices_and_bad_input_are_one_line_errors(lm, sae, tokens):
    assert select_latents(3, 12).tolist() == [0, 1, 2]
    assert select_latents([5, 2, 5], 12).tolist() == [2, 5]
    assert parse_features("7") == 7 and parse_features("1,4-6") == [1, 4, 5, 6] and parse_features(None) is None
    for bad in ("a,b", "5-2"):
        with pytest.raises(SaelabError):
            parse_features(bad)
    with pytest.raises(SaelabError, match=r"outside 0\.\.11"):
        select_latents([12], 12)
    with pytest.raises(SaelabError, match="closest"):
        compute_dashboard(lm, sae, tokens, "blocks.0.hook_resid_pots")
    with pytest.raises(SaelabError, match="width"):
        compute_dashboard(lm, TinySAE(8, 4, HOOK), tokens)
    with pytest.raises(SaelabError, match="integer ids"):
        compute_dashboard(lm, sae, tokens.float())
    with pytest.raises(SaelabError, match="positive"):
        DashboardConfig(top_windows=0).validate()


# ---------------------------------------------------------------------------------------- site and exports


def test_safe_json_escapes_everything_that_could_end_a_script():
    evil = ["</script><script>x()</script>", "<!--", XSS, "&lt;", "\u2028\u2029", "\u202e", "\ud800"]
    text = safe_json({"t": evil})
    assert not re.search(r"[<>&\u2028\u2029]", text) and text.isascii()
    assert json.loads(text) == {"t": evil}
    with pytest.raises(ValueError):
        safe_json({"x": float("nan")})


def test_site_has_one_data_file_per_latent_that_round_trips(site, board):
    assert (site / "index.html").is_file() and (site / "static" / "dashboard.js").is_file()
    html = (site / "index.html").read_text()
    assert "<script>" not in html and 'src="static/dashboard.js"' in html  # no inline script, so CSP holds
    files = sorted((site / "data" / "latents").glob("*.js"))
    assert len(files) == len(board.latents)
    key, data = read_data_script(files[0])
    assert key == f"latent:{data['id']}" and data == json.loads(json.dumps(board.latents[int(data["id"])]))
    key, index = read_data_script(site / "data" / "index.js")
    assert key == "index" and index["columns"]["id"] == [p["id"] for p in board.latents]
    from saelab.dashboard.site import MIN_HELPS_FIRINGS

    helps = [p["helps"] for p in board.latents]
    assert any(h["raises_loss_n"] >= MIN_HELPS_FIRINGS for h in helps)
    assert any(0 < h["raises_loss_n"] < MIN_HELPS_FIRINGS for h in helps)  # both branches are exercised
    assert index["columns"]["raises_loss"] == [
        h["raises_loss"] if h["raises_loss_n"] >= MIN_HELPS_FIRINGS else None for h in helps
    ]


def test_single_file_export_embeds_escaped_data_under_a_hash_csp(site, tmp_path):
    out = export_html(site, [0, 2], tmp_path / "two.html")
    page = out.read_text()
    data = page[page.index('id="saelab-data">') : page.index("</script>")]
    assert "<" not in data[len('id="saelab-data">') :] and "\u2028" not in data
    assert page.count("<script") == 2 and not re.search(r"<script[^>]*\ssrc=", page)  # tokens may say src=
    csp = re.search(r'content="([^"]*)"', page).group(1)
    assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp
    with pytest.raises(SaelabError, match="not in the dashboard"):
        export_html(site, [99], tmp_path / "bad.html")
    batch = json.loads(export_neuronpedia(site, tmp_path / "np.json", [1]).read_text())
    feature = batch["features"][0]
    assert feature["feature_index"] == 1 and len(feature["pos_str"]) == len(feature["pos_values"])
    assert sum(feature["freq_hist_data_bar_heights"]) > 0 and feature["activations"][0]["bin_min"] == -1


# ---------------------------------------------------------------------------------------- server and live view


def test_live_analysis_matches_the_reference(lm, sae):
    analyzer = PromptAnalyzer(lm, sae, max_latents=4)
    text = "for i in range(10):\n    print(i) </script> 中文"
    result = analyzer.analyze(text)
    assert "".join(result["tokens"]) == "<|endoftext|>" + text
    ids = torch.tensor(result["ids"])
    pairs = [(p, f) for p, fs in enumerate(result["firing"]) for f in fs if f[2] is not None]
    assert len(pairs) > 10 and all(len(fs) <= 4 for fs in result["firing"])
    for p, (latent, a, dce, direct) in pairs[:: max(1, len(pairs) // 6)]:
        assert close(a, brute_acts(lm, sae, ids)[p, latent].item(), 1e-4)
        assert close(dce, brute_dce(lm, sae, ids, p, latent), 1e-3)
        assert close(direct, brute_direct(lm, sae, ids, p, latent), 1e-3)
    with pytest.raises(SaelabError, match="at most 128"):
        analyzer.analyze("x " * 400)


def _request(url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_server_serves_the_site_with_csp_and_guards_the_api(site, lm, sae):
    server = make_server(site, 0, lambda: PromptAnalyzer(lm, sae))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert server.server_address[0] == "127.0.0.1"
        status, headers, body = _request(server.url)
        assert status == 200 and headers["Content-Security-Policy"] == CSP and b"dashboard.js" in body
        assert "default-src 'self'" in CSP and "unsafe-inline" not in CSP
        assert _request(server.url + "data/latents/0.js")[1]["Content-Type"].startswith("text/javascript")
        assert _request(server.url + "../../etc/passwd")[0] == 404
        assert _request(server.url + "%2e%2e/%2e%2e/etc/passwd")[0] == 404
        assert _request(server.url, headers={"Host": "evil.example:80"})[0] == 421
        api = server.url + "api/analyze"
        good = {"Content-Type": "application/json"}
        status, _, body = _request(api, json.dumps({"text": "def f(x):"}).encode(), good)
        result = json.loads(body)
        assert status == 200 and result["tokens"][0] == "<|endoftext|>" and len(result["firing"]) == len(result["ids"])
        assert _request(api, b"text=1", {"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
        assert _request(api, b'{"text": "x"}', {**good, "Origin": "http://evil.example"})[0] == 403
        assert _request(api, b"{", good)[0] == 400
        assert _request(api, json.dumps({"text": "  "}).encode(), good)[0] == 400
        assert _request(api, b"x" * 70_000, good)[0] == 413
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------- toy models


def test_toy_dashboard_matches_ground_truth_and_brute_force_loss():
    from saelab.dashboard.toy import compute_toy_dashboard, toy_loss
    from saelab.toy.model import ToyModel, ToyModelConfig

    torch.manual_seed(0)
    model = ToyModel(ToyModelConfig(n_features=5, d_hidden=2, n_instances=2, feature_probability=0.1))
    true = model.feature_directions(1)  # [5, 2]
    sae = TinySAE(2, 5, "hidden")
    with torch.no_grad():  # an SAE whose decoder rows are the true features, permuted
        perm = torch.tensor([3, 0, 4, 1, 2])
        sae.W_dec.copy_(true[perm] / true[perm].norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.fill_(-0.05)
    board = compute_toy_dashboard(model, 1, sae, n_samples=4000, cfg=DashboardConfig(seed=3), source="toy:x#1")
    assert board.meta["kind"] == "toy" and board.meta["ground_truth"]["recovered"] == 5
    for page in board.latents:
        assert page["ground_truth"]["feature"] == int(perm[page["id"]])
        assert page["ground_truth"]["cosine"] == pytest.approx(1.0, abs=1e-4)
    # Brute force the loss effect of latent 0 on the same samples (same seed, same draw).
    x = model.generate_batch(4000, torch.Generator().manual_seed(3))
    h = model.hidden(x)[:, 1]
    a = sae.encode(h)[:, 0].detach()
    fires = a > 0
    ablated = h[fires] - a[fires, None] * sae.W_dec[0].detach()
    expected = (toy_loss(model, x[fires], ablated, 1) - toy_loss(model, x[fires], h[fires], 1)).mean().item()
    assert close(board.latents[0]["importance"]["per_firing"]["mean"], expected, 1e-4)
    assert board.latents[0]["count"] == int(fires.sum())


# ---------------------------------------------------------------------------------------- end to end


def test_dashboard_command_builds_a_site_from_saved_folders(tok, tmp_path):
    """`saelab dashboard` on a saved SAE whose cfg.json names a saved language-model folder, then the live view
    that `saelab serve` would attach, loaded from what the site recorded."""
    import typer
    from typer.testing import CliRunner

    from saelab.dashboard.cli import dashboard, export, site_analyzer
    from saelab.dashboard.site import read_site
    from saelab.io import save_tensors
    from saelab.models.builtin import LMConfig
    from saelab.sae import SAEConfig, build_sae, save_sae

    lm_cfg = LMConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, n_ctx=64, d_vocab=len(tok))
    lm_dir = tmp_path / "lm"
    lm_dir.mkdir()
    model = HookedTransformer(lm_cfg.tl_config(), tokenizer=tok)
    save_tensors(lm_dir / "model.safetensors", dict(model.named_parameters()))
    tok.backend_tokenizer.save(str(lm_dir / "tokenizer.json"))
    (lm_dir / "cfg.json").write_text(json.dumps({"format": "saelab.lm", "version": 1, "model": vars(lm_cfg)}))
    sae = build_sae(SAEConfig(architecture="relu", d_in=32, d_sae=16), torch.Generator().manual_seed(0))
    sae.metadata = {"hook_name": HOOK, "model_name": str(lm_dir)}
    save_sae(sae, tmp_path / "sae")
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(ADVERSARIAL * 4):
        (data / f"doc{i}.txt").write_text(text)

    app = typer.Typer()
    app.command()(dashboard)
    out = tmp_path / "site"
    args = [str(tmp_path / "sae"), "--out", str(out), "--dataset", str(data), "--features", "0,3-5"]
    result = CliRunner().invoke(app, [*args, "--sequences", "6", "--context", "24"])
    assert result.exit_code == 0, result.output
    assert "dashboard written" in result.output and (out / "index.html").is_file()
    assert sorted(p.stem for p in (out / "data" / "latents").glob("*.js")) == ["0", "3", "4", "5"]
    info = read_site(out)
    assert info["model"] == str(lm_dir) and info["hook"] == HOOK
    # The site keeps the contexts it scanned, and the documents they come from: the page numbers can be redone.
    from saelab.io import load_tensors
    from saelab.models.data import documents, spread_contexts

    scanned = load_tensors(out / info["tokens"])["tokens"]
    expected, sources = spread_contexts(documents(str(data), "heldout"), tok, 24, tok.bos_token_id, 6, seed=0)
    assert torch.equal(scanned.long(), expected) and len(info["context_documents"]) == 6
    docs = documents(str(data))
    assert info["documents"] == [docs.name(d) for d in sorted({d for s in sources for d in s})]
    assert [[info["documents"][i] for i in c] for c in info["context_documents"]] == [
        [docs.name(d) for d in s] for s in sources
    ]
    analysis = site_analyzer(info)().analyze("<!-- 中 -->")
    assert "".join(analysis["tokens"]) == "<|endoftext|><!-- 中 -->"

    # A site saelab wrote, tokens file included, is its own output: a rebuild into it replaces it without --overwrite.
    again = CliRunner().invoke(app, [*args, "--sequences", "6", "--context", "24"])
    assert again.exit_code == 0, again.output

    export_app = typer.Typer()
    export_app.command()(export)
    result = CliRunner().invoke(export_app, [str(out), "--latents", "3,4", "--out", str(tmp_path / "x.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x.html").is_file()


def test_dashboard_of_a_toy_model_sae_reads_the_toy_model_it_names(tmp_path):
    from saelab.dashboard.cli import build_dashboard
    from saelab.dashboard.site import read_data_script, read_site
    from saelab.sae import SAEConfig, build_sae, save_sae
    from saelab.toy.model import ToyModel, ToyModelConfig, save_toy_model

    torch.manual_seed(0)
    toy = ToyModel(ToyModelConfig(n_features=5, d_hidden=2, n_instances=2))
    save_toy_model(toy, tmp_path / "toy")
    sae = build_sae(SAEConfig(architecture="relu", d_in=2, d_sae=5), torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec.copy_(toy.feature_directions(1) / toy.feature_directions(1).norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    sae.metadata = {"hook_name": "hidden", "model_name": "saelab-toy", "source": f"toy:{tmp_path / 'toy'}#1"}
    save_sae(sae, tmp_path / "sae")
    index = build_dashboard(tmp_path / "sae", tmp_path / "site", n_sequences=64, context=16)
    assert index.is_file() and read_site(tmp_path / "site")["kind"] == "toy"
    _, page = read_data_script(tmp_path / "site" / "data" / "latents" / "2.js")
    assert page["ground_truth"]["feature"] == 2 and page["ground_truth"]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert page["windows"] is None and page["count"] > 0


# ---------------------------------------------------------------------------------------- total ΔCE and importance


@pytest.mark.parametrize(("normalization", "positional"), [("LN", "standard"), ("RMS", "rotary")])
def test_total_effects_match_a_whole_forward_pass_with_one_ablated_position(tok, tokens, normalization, positional):
    lm = make_model(tok, normalization, positional)
    engine = Downstream(lm, HOOK)
    run = engine.clean(tokens[:3])
    eligible = eligible_positions(lm.regular_positions(tokens[:3]))
    g = torch.Generator().manual_seed(1)
    seq, pos = torch.tensor([0, 0, 1, 2, 2, 1]), torch.tensor([1, 17, 5, 22, 0, 16])
    delta = torch.randn(6, 32, generator=g)
    total, same, _ = engine.total_effects(run, seq, pos, delta, eligible)
    # Starting from cached residuals (the dashboard's second pass) gives the same numbers.
    cached, _, _ = engine.total_effects(engine.clean(tokens[:3], run.resid_start), seq, pos, delta, eligible)
    assert torch.allclose(cached, total, atol=1e-5)
    single, _ = engine.loss_effects(run, seq, pos, delta)
    assert torch.allclose(same, single, atol=2e-5, rtol=1e-4)
    for i in range(6):
        row = tokens[seq[i]]
        expected = brute_joint_total(lm, row, [int(pos[i])], [delta[i]])
        assert close(total[i].item(), expected, 1e-4)
    assert (total - same.double()).abs().max() > 1e-2  # later positions matter: the check is not vacuous


def test_gradient_attribution_is_the_directional_derivative_of_the_summed_loss(board, lm, sae, tokens):
    """The per-position estimate on the pages, −a · W_dec[j] · ∂L/∂x, against a central finite difference of the
    summed loss along W_dec[j] at that position (whole forward passes, float64 loss sums)."""
    checked = 0
    for page in board.latents[:4]:
        j = page["id"]
        for window in page["windows"]["top"][:2]:
            row, p = tokens[window["seq"]], window["start"] + window["center"]
            grad, a = window["grad"][window["center"]], window["acts"][window["center"]]
            if grad is None or not counted(lm, row)[p]:
                continue
            eps = 1e-2
            d = sae.W_dec[j].detach()
            up = brute_joint_total(lm, row, [p], [-eps * d])  # adds eps·d
            down = brute_joint_total(lm, row, [p], [eps * d])
            expected = -a * (up - down) / (2 * eps)
            assert abs(grad - expected) <= 2e-3 * max(1.0, abs(expected))
            checked += 1
    assert checked >= 3


def test_importance_is_the_mean_total_effect_over_every_firing(board, lm, sae, tokens):
    all_acts = torch.stack([brute_acts(lm, sae, row) for row in tokens])
    elig = eligible_positions(tokens != lm.bos_token_id)
    n_tokens = int((tokens != lm.bos_token_id).sum())
    for page in board.latents[:4]:
        j = page["id"]
        acts = all_acts[..., j]
        s, p = ((acts > 0) & elig).nonzero(as_tuple=True)
        totals = [
            brute_joint_total(lm, tokens[a], [int(b)], [acts[a, b] * sae.W_dec[j].detach()])
            for a, b in zip(s, p, strict=True)
        ]
        imp = page["importance"]
        assert imp["firings"] == imp["exact"] == len(totals) and imp["method"] == "exact"
        assert imp["contexts"] == len(set(s.tolist()))
        assert imp["too_few"] == (len(totals) < 20 or imp["contexts"] < 5)
        assert close(imp["per_firing"]["mean"], float(np.mean(totals)), 1e-4)
        assert close(imp["per_token"]["mean"], float(np.sum(totals)) / n_tokens, 1e-4)
        # Per-context sums give the interval: a t-interval around the ratio, not a closed one.
        assert imp["per_firing"]["lo"] < imp["per_firing"]["mean"] < imp["per_firing"]["hi"]


def test_per_token_importance_matches_ablating_every_firing_at_once(tok):
    """Importance per token sums each firing's own total ΔCE; removing the latent at every firing of a context at
    once differs from that sum only by the interactions between firings of one context, which are second order in
    the removed contributions. With contributions ~10 % of the residual's norm and about two firings per context,
    those interactions stay within a few per cent of the effect: we allow 10 %."""
    lm = make_model(tok)
    tokens = make_tokens(tok, n_seq=16, length=24, seed=3)
    sae = TinySAE(32, 8, HOOK, seed=2, bias=-0.9)
    with torch.no_grad():
        sae.W_dec.mul_(0.5)
    cfg = DashboardConfig(exact_firings=10_000, top_windows=2, windows_per_interval=0, corr_tokens=0)
    board = compute_dashboard(lm, sae, tokens, HOOK, cfg=cfg)
    all_acts = torch.stack([brute_acts(lm, sae, row) for row in tokens])
    elig = eligible_positions(tokens != lm.bos_token_id)
    n_tokens = int((tokens != lm.bos_token_id).sum())
    compared = 0
    for page in board.latents:
        j = page["id"]
        fires = (all_acts[..., j] > 0) & elig
        if fires.sum() < 3:
            continue
        joint = 0.0
        for s in fires.any(1).nonzero().squeeze(1).tolist():
            positions = fires[s].nonzero().squeeze(1).tolist()
            joint += brute_joint_total(lm, tokens[s], positions, [all_acts[s, p, j] * sae.W_dec[j] for p in positions])
        per_token = page["importance"]["per_token"]["mean"]
        assert abs(per_token - joint / n_tokens) <= 0.1 * abs(joint / n_tokens) + 1e-4
        compared += 1
    assert compared >= 3


def test_top_n_picks_the_latents_the_cheap_estimate_ranks_first(lm, sae, tokens):
    assert parse_features("top:3") == Top(3, []) and parse_features("top:2,7,9-10") == Top(2, [7, 9, 10])
    with pytest.raises(SaelabError, match="top:N"):
        parse_features("top:0")
    cfg = DashboardConfig(exact_firings=8, top_windows=2, windows_per_interval=0, min_firings=5, corr_tokens=0)
    everything = compute_dashboard(lm, sae, tokens, HOOK, cfg=cfg)
    ranking = everything.meta["ranking"]
    # The ranking pass and the statistics pass compute the estimate along different paths: they agree.
    assert ranking == rank_latents(lm, sae, tokens, HOOK, cfg)
    ok = [j for j in range(12) if ranking["firings"][j] >= 5]
    expected = sorted(ok, key=lambda j: -ranking["per_token"][j])[:3]
    board = compute_dashboard(lm, sae, tokens, HOOK, features=Top(3, [11]), cfg=cfg)
    assert board.meta["latents"] == sorted({*expected, 11}) and board.meta["chosen_by"] == "top:3,11"
