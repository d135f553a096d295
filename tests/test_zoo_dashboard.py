"""Dashboards and the live view on zoo models: a real (briefly trained) SAE on zoo:cumsum, whole task sequences as
windows with the task's labels, loss effects on the task's scored positions checked against plain TransformerLens
runs, the best latent per task variable on the index, and task inputs in the live view."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.dashboard.cli import build_dashboard, compute_zoo_dashboard
from saelab.dashboard.compute import DashboardConfig, Top, compute_dashboard, rank_latents
from saelab.dashboard.effects import CleanRun, loss_gradient
from saelab.dashboard.live import PromptAnalyzer
from saelab.dashboard.server import make_server
from saelab.dashboard.site import read_data_script
from saelab.dashboard.zoo import DASHBOARD_SEED, TaskDownstream
from saelab.errors import SaelabError
from saelab.models.access import load_model
from saelab.models.zoo.tasks import IGNORE
from saelab.sae.io import load_sae, save_sae
from saelab.sae.model import SAEConfig, build_sae

HOOK = "blocks.0.hook_resid_post"
N_SEQUENCES = 48


@pytest.fixture(scope="module")
def cumsum():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model("zoo:cumsum")
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def site(cumsum, tmp_path_factory):
    """A TopK SAE trained for 150 steps on fresh cumsum activations, saved, and its dashboard built from the folder."""
    root = tmp_path_factory.mktemp("zoo")
    sae = build_sae(SAEConfig(architecture="topk", d_in=24, d_sae=16, k=3), torch.Generator().manual_seed(0))
    sae.metadata = {"hook_name": HOOK, "model_name": "zoo:cumsum"}
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(150):
        with torch.no_grad():
            x = cumsum.activations(cumsum.task.sample(64, step).tokens, [HOOK])[HOOK].flatten(0, 1)
        loss = (sae.decode(sae.encode(x)) - x).square().sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_sae(sae, root / "sae")
    cfg = DashboardConfig(exact_firings=4, top_windows=3, windows_per_interval=1)
    index = build_dashboard(root / "sae", root / "site", n_sequences=N_SEQUENCES, cfg=cfg, progress=False)
    return index.parent, load_sae(root / "sae")


def pages(site_dir):
    _, index = read_data_script(site_dir / "data" / "index.js")
    latents = {j: read_data_script(site_dir / "data" / "latents" / f"{j}.js")[1] for j in index["meta"]["latents"]}
    return index, latents


def plain_task_ce(model, tokens, labels, hook=None, position=None, delta=None):
    """CE [T] against the task labels (0 where not scored), with `delta` removed at `position` by a TL hook."""

    def remove(act, hook):
        act = act.clone()
        act[0, position] -= delta
        return act

    hooks = [] if hook is None else [(hook, remove)]
    logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0].double()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")


def test_windows_are_whole_task_sequences_with_task_labels(cumsum, site):
    site_dir, _ = site
    index, latents = pages(site_dir)
    data = cumsum.task.sample(N_SEQUENCES, DASHBOARD_SEED, "heldout")
    assert index["meta"]["tokens"]["sequences"] == N_SEQUENCES and index["meta"]["tokens"]["length"] == 20
    seen = 0
    for page in latents.values():
        for window in page["windows"]["top"] + [w for iv in page["windows"]["intervals"] for w in iv["windows"]]:
            assert window["start"] == 0 and window["before"] == [] and window["after"] == []
            assert window["tokens"] == [cumsum.task.vocab[t] for t in data.tokens[window["seq"]].tolist()]
            labels = data.labels[window["seq"]].tolist()
            assert window["labels"] == [None if y == IGNORE else cumsum.task.outputs[y] for y in labels]
            assert window["acts"][window["center"]] > 0
            seen += 1
    assert seen >= 10
    assert json.loads((site_dir / "site.json").read_text())["model"] == "zoo:cumsum"


def test_same_position_loss_effects_match_plain_hooked_runs(cumsum, site):
    site_dir, sae = site
    _, latents = pages(site_dir)
    data = cumsum.task.sample(N_SEQUENCES, DASHBOARD_SEED, "heldout")
    checked, moved = 0, 0
    for j, page in latents.items():
        for window in page["windows"]["top"][:2]:
            tokens, labels = data.tokens[window["seq"]], data.labels[window["seq"]]
            with torch.no_grad():
                clean = plain_task_ce(cumsum.model, tokens, labels)
            for p, (a, shown) in enumerate(zip(window["acts"], window["loss"], strict=True)):
                if a > 0:
                    with torch.no_grad():
                        ablated = plain_task_ce(cumsum.model, tokens, labels, HOOK, p, a * sae.W_dec[j].detach())
                    assert shown == pytest.approx(float(ablated[p] - clean[p]), rel=2e-3, abs=2e-5)
                    checked += 1
                    moved += abs(shown) > 1e-4
    assert checked >= 20 and moved >= 3


@pytest.mark.parametrize("name", ["sum", "palindromes"])
@torch.no_grad()
def test_total_effects_sum_the_loss_change_over_scored_positions_only(name):
    """On tasks whose scored positions are a strict subset (answer digits; the END token), against plain runs."""
    lm = load_model(f"zoo:{name}")
    hook = "blocks.0.attn.hook_z"
    data = lm.task.sample(3, 7, "heldout")
    assert not data.scored.all()
    engine = TaskDownstream(lm, hook)
    run = engine.clean(data.tokens)
    run = CleanRun(**{**run.__dict__, "targets": data.labels})
    g = torch.Generator().manual_seed(0)
    T = data.tokens.shape[1]
    seq = torch.tensor([0, 0, 1, 2, 2, 2])
    pos = torch.tensor([0, T // 2, T - 1, 1, T - 3, T - 2])
    delta = torch.randn(len(seq), run.x_hook.shape[-1], generator=g) * 2
    total, same, _ = engine.total_effects(run, seq, pos, delta, data.scored)
    n_heads = lm.model.cfg.n_heads
    for i in range(len(seq)):
        s, p = int(seq[i]), int(pos[i])
        clean = plain_task_ce(lm.model, data.tokens[s], data.labels[s])
        ablated = plain_task_ce(lm.model, data.tokens[s], data.labels[s], hook, p, delta[i].view(n_heads, -1))
        change = ablated - clean
        expected_total = sum(float(change[q]) for q in range(p, T) if data.scored[s, q])
        assert float(total[i]) == pytest.approx(expected_total, rel=1e-4, abs=1e-6)
        if data.scored[s, p]:
            assert float(same[i]) == pytest.approx(float(change[p]), rel=1e-4, abs=1e-6)
        else:
            assert same[i].isnan()


@pytest.mark.parametrize("name", ["sum", "palindromes"])
@torch.no_grad()
def test_output_logits_and_direct_path_match_plain_runs_through_the_final_residual(name):
    """An SAE on block 0 of a two-block LayerNorm model. Each latent's promoted and suppressed task outputs are the
    mean, over its firings, of the change in the output logits at the firing when a·W_dec[j] is removed from the
    final residual there, in a whole forward pass; each output listed once (sum: 6 and 6 of 12; palindromes: 1 and
    1). A window's direct-path ΔCE is the task loss change of that same pass at the firing (blank where it is not
    scored), and its logit change is the label's."""
    lm = load_model(f"zoo:{name}")
    final = f"blocks.{lm.model.cfg.n_layers - 1}.hook_resid_post"
    assert final != HOOK and lm.model.cfg.normalization_type == "LN"
    sae = build_sae(
        SAEConfig(architecture="topk", d_in=lm.d_hook(HOOK), d_sae=12, k=3), torch.Generator().manual_seed(1)
    )
    sae.metadata = {"hook_name": HOOK}
    data = lm.task.sample(6, 11, "heldout")
    cfg = DashboardConfig(top_windows=2, windows_per_interval=1)
    board = compute_dashboard(lm, sae, data.tokens, HOOK, cfg=cfg, labels=data.labels)
    acts = sae.encode(lm.activations(data.tokens, [HOOK])[HOOK])  # [S, T, d_sae]
    clean = lm.model(data.tokens).double()
    outputs = lm.task.outputs

    def removed(s: int, p: int, j: int) -> Tensor:  # output logits [n_outputs] at p, the contribution removed
        def remove(act, hook):
            act = act.clone()
            act[0, p] -= acts[s, p, j] * sae.W_dec[j]
            return act

        return lm.model.run_with_hooks(data.tokens[s : s + 1], fwd_hooks=[(final, remove)])[0, p].double()

    n_top, n_bottom = min(10, (len(outputs) + 1) // 2), min(10, len(outputs) // 2)
    checked_logits, checked_direct = 0, set()
    for page in board.latents:
        j = page["id"]
        firings = (acts[..., j] > 0).nonzero().tolist()
        if page["logits"]["positions"] == len(firings):  # every firing sampled (at most 64)
            change = torch.stack([clean[s, p] - removed(s, p, j) for s, p in firings]).mean(0)
            order = change.argsort(descending=True).tolist()
            top, bottom = page["logits"]["top"], page["logits"]["bottom"]
            assert [t for t, _ in top] == [outputs[i] for i in order[:n_top]]
            assert [t for t, _ in bottom] == [outputs[i] for i in order[::-1][:n_bottom]]
            for (_, shown), i in zip(top + bottom, order[:n_top] + order[::-1][:n_bottom], strict=True):
                assert shown == pytest.approx(float(change[i]), rel=1e-3, abs=1e-5)
            checked_logits += 1
        for window in page["windows"]["top"] + [w for iv in page["windows"]["intervals"] for w in iv["windows"]]:
            s = window["seq"]
            for p, a in enumerate(window["acts"]):
                if a <= 0:
                    continue
                label = int(data.labels[s, p])
                if label == IGNORE:
                    assert window["direct"][p] is None and window["logit"][p] is None
                    continue
                logits = removed(s, p, j)
                ce = F.cross_entropy(logits, torch.tensor(label)) - F.cross_entropy(clean[s, p], torch.tensor(label))
                assert window["direct"][p] == pytest.approx(float(ce), rel=2e-3, abs=1e-5)
                assert window["logit"][p] == pytest.approx(
                    float(clean[s, p, label] - logits[label]), rel=2e-3, abs=1e-5
                )
                checked_direct.add((s, p, j))
    assert checked_logits >= 4 and len(checked_direct) >= 3
    assert board.meta["approximation"]["direct_path"]["positions"] >= len(checked_direct)


def test_attribution_gradient_is_that_of_the_task_loss_on_scored_positions():
    lm = load_model("zoo:sum")
    data = lm.task.sample(4, 3, "heldout")
    grad = loss_gradient(lm, HOOK, data.tokens, data.scored, (), data.labels)["grad"]
    found = {}

    def leaf(act, hook):
        found["x"] = act.detach().requires_grad_(True)
        return found["x"]

    logits = lm.model.run_with_hooks(data.tokens, fwd_hooks=[(HOOK, leaf)]).double()
    loss = sum(
        F.cross_entropy(logits[b, p], data.labels[b, p])
        for b in range(4)
        for p in range(data.tokens.shape[1])
        if data.scored[b, p]
    )
    expected = torch.autograd.grad(loss, found["x"])[0]
    assert torch.allclose(grad, expected.float(), atol=1e-6) and expected.abs().max() > 1e-3


def test_index_names_the_best_latent_per_task_variable(cumsum, site):
    site_dir, sae = site
    index, _ = pages(site_dir)
    task_meta = index["meta"]["task"]
    assert task_meta["name"] == "cumsum" and task_meta["variable"] == "running_sum"
    data = cumsum.task.sample(N_SEQUENCES, DASHBOARD_SEED, "heldout")
    with torch.no_grad():
        acts = cumsum.activations(data.tokens, [HOOK])[HOOK][data.variable_mask]
        latents = sae.encode(acts).double().numpy()
    running_sum = data.variable[data.variable_mask].double().numpy()
    corr = [np.corrcoef(latents[:, i], running_sum)[0, 1] if latents[:, i].std() > 0 else 0.0 for i in range(16)]
    (match,) = task_meta["variable_latents"]
    assert match["latent"] == int(np.argmax(corr)) and match["correlation"] == pytest.approx(max(corr), abs=1e-4)
    assert len(task_meta["example"].split()) == 20


def test_top_n_also_builds_the_pages_of_the_latents_the_index_names(cumsum, site):
    """`--features top:N` on a zoo model: the N most important latents and the best match for each value of the
    task variable, whose links on the index would otherwise lead nowhere."""
    _, sae = site
    cfg = DashboardConfig(exact_firings=2, top_windows=1, windows_per_interval=0)
    data = cumsum.task.sample(16, DASHBOARD_SEED, "heldout")  # the sequences the dashboard scans
    ranking = rank_latents(cumsum, sae, data.tokens, HOOK, cfg, labels=data.labels)
    board = compute_zoo_dashboard(cumsum, sae, HOOK, Top(1), cfg, 16, False)
    (match,) = board.meta["task"]["variable_latents"]
    best = int(np.argmax([x if x is not None else -np.inf for x in ranking["per_token"]]))
    assert match["latent"] != best  # so that the page is there because it is named, not because it ranks first
    assert board.meta["latents"] == sorted({best, match["latent"]})


@torch.no_grad()
def test_live_view_reads_task_inputs_and_refuses_malformed_ones(cumsum, site):
    site_dir, sae = site
    analyzer = PromptAnalyzer(cumsum, sae, HOOK)
    result = analyzer.analyze("3 1 -4 1 5")
    assert result["tokens"] == ["3", "1", "-4", "1", "5"]
    assert result["answers"] == ["positive", "positive", "zero", "positive", "positive"]
    tokens = cumsum.task.encode("3 1 -4 1 5")[None]
    acts = sae.encode(cumsum.activations(tokens, [HOOK])[HOOK])[0]
    for p, firing in enumerate(result["firing"]):
        assert sorted(j for j, *_ in firing) == sorted((acts[p] > 0).nonzero().squeeze(1).tolist())
        for j, a, *_ in firing:
            assert a == pytest.approx(float(acts[p, j]), rel=1e-4)
    for bad, message in (("3 x 4", "'x' is not a token of cumsum"), (" ".join(["1"] * 21), "1 to 20 tokens")):
        with pytest.raises(SaelabError, match=message):
            analyzer.analyze(bad)
    server = make_server(site_dir, 0, analyzer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api/analyze"

        def post(text):
            body = json.dumps({"text": text}).encode()
            request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as reply:
                    return reply.status, json.loads(reply.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        status, body = post("0 0 5")
        assert status == 200 and body["tokens"] == ["0", "0", "5"]
        status, body = post("3 seven")
        assert status == 400 and "\n" not in body["error"] and "'seven' is not a token of cumsum" in body["error"]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="Debian's chromium is not installed")
def test_pages_show_the_task_variable_and_take_task_inputs_in_chromium(cumsum, site):
    sync_api = pytest.importorskip("playwright.sync_api")
    site_dir, sae = site
    index, latents = pages(site_dir)
    (match,) = index["meta"]["task"]["variable_latents"]
    server = make_server(site_dir, 0, PromptAnalyzer(cumsum, sae, HOOK))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    errors: list[str] = []
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(server.url + "#/")
            page.wait_for_selector("#task-variable tbody tr")
            cells = page.eval_on_selector_all("#task-variable tbody td", "ts => ts.map(t => t.textContent)")
            assert cells[:2] == ["running_sum", f"#{match['latent']}"]
            # A latent page: the output-logit table, labelled by the task's outputs (3 for cumsum: all fit, each
            # once), and a window token's tooltip names the label its loss scores.
            j, shown = max(latents.items(), key=lambda item: item[1]["count"])
            page.goto(server.url + f"#/latent/{j}")
            page.wait_for_selector("#logit-effects table.logits")
            assert "Output logit effects" in page.text_content("#logit-effects h2")
            tables = page.eval_on_selector_all(
                "#logit-effects table.logits", "ts => ts.map(t => Array.from(t.rows, r => r.cells[0].textContent))"
            )
            assert tables == [[t for t, _ in shown["logits"][side]] for side in ("top", "bottom")]
            assert sorted(tables[0] + tables[1]) == sorted(cumsum.task.outputs)
            signs = page.eval_on_selector_all(
                "#logit-effects td.num", "ts => ts.map(t => [t.className, t.textContent])"
            )
            assert [("neg" in c) == v.startswith("-") for c, v in signs] == [True] * len(signs)  # coloured by sign
            window = shown["windows"]["top"][0]
            page.locator(".window").first.locator(".tok").nth(window["center"]).hover()
            rows = dict(
                page.eval_on_selector_all(
                    ".tooltip tr", "rs => rs.map(r => [r.cells[0].textContent, r.cells[1].textContent])"
                )
            )
            assert rows["label"] == window["labels"][window["center"]] and "next token" not in rows
            assert "ΔCE here (direct path)" in rows
            page.goto(server.url + "#/live")
            page.wait_for_selector("textarea")
            assert page.input_value("textarea") == index["meta"]["task"]["example"]
            page.fill("textarea", "3 1 -4 1 5")
            page.click("button.primary")
            page.wait_for_selector("#live-output .tok, #live-output .error")
            texts = page.eval_on_selector_all("#live-output .window .tok", "ts => ts.map(t => t.textContent)")
            assert texts == ["3", "1", "-4", "1", "5"]
            # A typed input has no labels: no loss column, no ΔCE colouring; a token shows the model's answer.
            heads = page.eval_on_selector_all("#live-output th", "ts => ts.map(t => t.textContent)")
            assert heads and not any("ΔCE" in t for t in heads) and page.locator("#live-output select").count() == 0
            page.locator("#live-output .window .tok").nth(2).click()
            assert "model's answer zero" in page.text_content("#live-output .grid")
            page.fill("textarea", "3 x")
            page.click("button.primary")
            page.wait_for_selector("#live-output .error")
            assert "'x' is not a token of cumsum" in page.text_content("#live-output .error")
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert [e for e in errors if "400" not in e] == []
