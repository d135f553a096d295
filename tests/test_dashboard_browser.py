"""The real generated pages in Debian's headless Chromium (Playwright): adversarial tokens stay text, nothing runs,
multi-byte characters show whole, and the numbers on the pages match an independent brute-force computation.

Skipped only when /usr/bin/chromium is absent (CI installs it).
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import pytest
import torch
from dashboard_helpers import (
    ADVERSARIAL,
    HOOK,
    TinySAE,
    brute_acts,
    brute_dce,
    brute_final,
    make_adversarial_tokens,
    make_model,
    make_tokenizer,
)
from models_helpers import BOS

from saelab.dashboard.compute import DashboardConfig, compute_dashboard
from saelab.dashboard.export import export_html
from saelab.dashboard.live import PromptAnalyzer
from saelab.dashboard.server import make_server
from saelab.dashboard.site import read_data_script, write_site
from saelab.dashboard.text import token_strings

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
sync_api = pytest.importorskip("playwright.sync_api")

# What a successful injection would leave behind: a global, a dialog, or a live element.
PWNED_CHECK = """() => ({
  pwned: window.__pwned === 1,
  imgs: document.querySelectorAll("img, iframe, object, embed").length,
  handlers: document.querySelectorAll("[onerror], [onload], [onclick]").length,
  scripts: Array.from(document.scripts)
    .filter((s) => !s.src.endsWith("static/dashboard.js") && s.type !== "application/json")
    .filter((s) => !s.textContent.includes("saelab dashboard: renders")).length,
})"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        tok = make_tokenizer()
        lm = make_model(tok)
        sae = TinySAE(32, 10, HOOK)
        tokens = make_adversarial_tokens(tok)
        cfg = DashboardConfig(top_windows=4, windows_per_interval=1, context_before=16, context_after=8)
        board = compute_dashboard(lm, sae, tokens, HOOK, cfg=cfg)
        site = write_site(board, tmp_path_factory.mktemp("browser") / "site", {"kind": "lm", "hook": HOOK})
        server = make_server(site, 0, PromptAnalyzer(lm, sae))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield {"tok": tok, "lm": lm, "sae": sae, "tokens": tokens, "board": board, "site": site, "server": server}
    server.shutdown()
    server.server_close()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        yield b
        b.close()


class Page:
    """A browser tab that records page errors, console errors (CSP violations among them) and dialogs."""

    def __init__(self, browser, url: str) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("dialog", lambda d: (self.errors.append(f"dialog: {d.message}"), d.dismiss()))
        self.page.goto(url)

    def assert_clean(self) -> None:
        state = self.page.evaluate(PWNED_CHECK)
        assert state == {"pwned": False, "imgs": 0, "handlers": 0, "scripts": 0}
        assert self.errors == []


def window_texts(page) -> list[list[str]]:
    return page.eval_on_selector_all(
        ".window", "ws => ws.map(w => Array.from(w.querySelectorAll('.tok')).map(t => t.textContent))"
    )


@pytest.mark.parametrize("via", ["file", "server"])
def test_static_site_shows_adversarial_tokens_as_text(world, browser, via):
    site, board = world["site"], world["board"]
    base = world["server"].url if via == "server" else (site / "index.html").as_uri()
    tab = Page(browser, base)
    tab.page.wait_for_selector("table.latents tbody tr")
    assert tab.page.locator("table.latents tbody tr").count() == len(board.latents)
    seen = ""
    for page_data in board.latents:
        tab.page.goto(f"{base}#/latent/{page_data['id']}")
        tab.page.wait_for_selector(f"h1:text('Latent {page_data['id']}')")
        windows = page_data["windows"]["top"] + [w for iv in page_data["windows"]["intervals"] for w in iv["windows"]]
        shown = window_texts(tab.page)
        assert shown == [w["tokens"] for w in windows]  # every token's text exactly as in the data, in order
        for w, texts in zip(windows, shown, strict=True):  # and the data is the decoded text itself
            decoded = world["tok"].decode(world["tokens"][w["seq"]].tolist())
            assert "".join(texts) in decoded
            seen += "".join(texts)
        tab.assert_clean()
    for marker in ("</script>", "<!--", "onerror=", "&lt;", "\u202e", "😀", "中"):
        assert marker in seen  # the check above was not vacuous
    bidi = tab.page.eval_on_selector(".tok", "t => getComputedStyle(t).unicodeBidi")
    assert bidi == "isolate"  # an RTL override inside a token cannot reorder its neighbours


def test_values_on_the_page_match_brute_force(world, browser):
    board, lm, sae, tokens = world["board"], world["lm"], world["sae"], world["tokens"]
    page_data = max(board.latents, key=lambda p: p["count"])
    j = page_data["id"]
    tab = Page(browser, (world["site"] / "index.html").as_uri() + f"#/latent/{j}")
    tab.page.wait_for_selector(".window")
    window = page_data["windows"]["top"][0]
    row = tokens[window["seq"]]
    acts = brute_acts(lm, sae, row)[:, j]
    shown_max = tab.page.locator(".stat", has_text="max activation").locator(".value").text_content()
    assert abs(float(shown_max) - acts.max().item()) <= 5e-3 * acts.max().item()
    checked = 0
    spans = tab.page.locator(".window").first.locator(".tok")
    for i in range(spans.count()):
        pos = window["start"] + i
        spans.nth(i).hover()
        rows = dict(
            tab.page.eval_on_selector_all(
                ".tooltip tr", "rs => rs.map(r => [r.cells[0].textContent, r.cells[1].textContent])"
            )
        )
        assert int(rows["position"]) == pos
        assert abs(float(rows["activation"]) - acts[pos].item()) <= 1e-3 * max(1, acts[pos].item())
        if "ΔCE here (exact)" in rows:
            expected = brute_dce(lm, sae, row, pos, j)
            assert abs(float(rows["ΔCE here (exact)"]) - expected) <= 2e-3 * max(1, abs(expected))
            # The next token, and the logit change the latent makes for it through the final norm.
            next_token = token_strings(world["tok"], row.tolist())[pos + 1]
            assert rows["next token"] == json.dumps(next_token, ensure_ascii=False)
            x = brute_final(lm, row)[pos]
            d = acts[pos] * sae.W_dec[j].detach()
            change = lm.model.ln_final(x[None]) - lm.model.ln_final((x - d)[None])
            expected_logit = (change[0] @ lm.model.W_U.detach()[:, row[pos + 1]]).item()
            assert abs(float(rows["its logit change"]) - expected_logit) <= 2e-3 * max(1, abs(expected_logit))
            checked += 1
    assert checked >= 2
    # A latent whose importance is a control-variate estimate shows how much of its interval the sampling makes.
    sampled = next(p for p in board.latents if p["importance"]["method"] == "control variate")
    tab.page.goto((world["site"] / "index.html").as_uri() + f"#/latent/{sampled['id']}")
    tab.page.wait_for_selector(f"h1:text-is('Latent {sampled['id']}')")
    shown = tab.page.locator(".stat", has_text="interval from sampling").locator(".value").text_content()
    assert shown.startswith(f"{round(100 * sampled['importance']['sampling_share'])} % of the interval's variance")
    tab.assert_clean()


def test_live_view_runs_the_model_and_shows_the_prompt_as_written(world, browser):
    lm, sae = world["lm"], world["sae"]
    prompt = ADVERSARIAL[0] + " " + ADVERSARIAL[2] + " " + ADVERSARIAL[4] + " " + ADVERSARIAL[5]
    tab = Page(browser, world["server"].url + "#/live")
    tab.page.fill("textarea", prompt)
    tab.page.click("button.primary")
    tab.page.wait_for_selector("#live-output .tok, #live-output .error")
    assert tab.page.locator("#live-output .error").count() == 0, tab.page.locator("#live-output").text_content()
    texts = tab.page.eval_on_selector_all("#live-output .window .tok", "ts => ts.map(t => t.textContent)")
    assert "".join(texts) == BOS + prompt
    ids = torch.tensor([lm.bos_token_id, *world["tok"].encode(prompt, add_special_tokens=False)])
    position = 3
    tab.page.locator("#live-output .window .tok").nth(position).click()
    first = tab.page.locator("#live-output table").nth(1).locator("tbody tr").first
    latent = int(first.locator("td").nth(0).text_content().lstrip("#"))
    act = float(first.locator("td").nth(1).text_content())
    dce = float(first.locator("td").nth(2).text_content())
    assert abs(act - brute_acts(lm, sae, ids)[position, latent].item()) <= 1e-3
    expected = brute_dce(lm, sae, ids, position, latent)
    assert abs(dce - expected) <= 2e-3 * max(1, abs(expected))
    # The selected latent's row is marked; a ΔCE colouring; the result survives leaving and coming Back.
    assert tab.page.locator("#live-output tr.selected").count() == 1
    tab.page.select_option("#live-output select", "loss")
    tab.page.goto(world["server"].url + "#/")
    tab.page.wait_for_selector("table.latents tbody tr")
    tab.page.go_back()
    tab.page.wait_for_selector("#live-output .tok")
    assert tab.page.eval_on_selector_all("#live-output .window .tok", "ts => ts.map(t => t.textContent)") == texts
    assert tab.page.input_value("#live-output select") == "loss"
    tab.assert_clean()


def test_live_table_sorts_by_summed_loss_effect_and_from_the_keyboard(world, browser):
    """The live view's latent table: headers explain themselves, sorted by Σ ΔCE (descending) at first, re-sorted
    from the keyboard (Enter, then Space reverses) with aria-sort saying how; the selected latent's row is
    highlighted; a token's tooltip shows the selected latent's exact ΔCE there, as brute force computes it, and the
    ΔCE colouring gives it the colour of its sign."""
    lm, sae = world["lm"], world["sae"]
    prompt = "def f(x):\n    return x + 1\n"
    tab = Page(browser, world["server"].url + "#/live")
    tab.page.fill("textarea", prompt)
    tab.page.click("button.primary")
    tab.page.wait_for_selector("#live-output .tok")
    table = tab.page.locator("#live-output table.live-latents").first

    def column(i: int) -> list[float]:
        return [float(t) for t in table.locator(f"tbody tr td:nth-child({i})").all_text_contents()]

    heads = table.locator("thead th")
    assert all(heads.nth(i).get_attribute("title") for i in range(heads.count()))
    loss_head = table.locator("th[data-key='loss']")
    assert loss_head.get_attribute("aria-sort") == "descending" and "ΔCE" in loss_head.get_attribute("title")
    sums = column(3)
    assert len(sums) >= 3 and sums == sorted(sums, reverse=True) and len(set(sums)) > 1
    table.locator("th[data-key='max']").focus()
    tab.page.keyboard.press("Enter")
    assert table.locator("th[data-key='max']").get_attribute("aria-sort") == "descending"
    assert table.locator("th[data-key='loss']").get_attribute("aria-sort") is None
    assert column(2) == sorted(column(2), reverse=True)
    tab.page.keyboard.press(" ")  # focus stayed on the header
    assert table.locator("th[data-key='max']").get_attribute("aria-sort") == "ascending"
    assert column(2) == sorted(column(2))
    # The selected row stands out from the others.
    selected = table.locator("tbody tr.selected")
    other = table.locator("tbody tr:not(.selected)").first
    colour = "r => getComputedStyle(r.cells[1]).backgroundColor"
    assert selected.count() == 1 and selected.evaluate(colour) != other.evaluate(colour)
    # Select the latent that fires most strongly at a token, then hover that token: its exact ΔCE there.
    ids = torch.tensor([lm.bos_token_id, *world["tok"].encode(prompt, add_special_tokens=False)])
    acts = brute_acts(lm, sae, ids)
    position = int(acts[1:-1].max(1).values.argmax()) + 1  # a token with a next token, not BOS
    latent = int(acts[position].argmax())
    table.locator("tbody tr", has=tab.page.locator(f"a[href='#/latent/{latent}']")).locator("td").nth(1).click()
    assert int(table.locator("tbody tr.selected td").first.text_content().lstrip("#")) == latent
    tab.page.locator("#live-output .window .tok").nth(position).hover()
    rows = dict(
        tab.page.eval_on_selector_all(
            ".tooltip tr", "rs => rs.map(r => [r.cells[0].textContent, r.cells[1].textContent])"
        )
    )
    expected = brute_dce(lm, sae, ids, position, latent)
    assert float(rows["its ΔCE here (exact)"]) == pytest.approx(expected, rel=2e-3, abs=2e-4)
    # Coloured by ΔCE: blue where removing the latent raises the loss, red where it lowers it.
    tab.page.select_option("#live-output select", "loss")
    background = tab.page.locator("#live-output .window .tok").nth(position).evaluate("t => t.style.backgroundColor")
    assert background.startswith("rgba(37, 99, 235" if expected > 0 else "rgba(220, 38, 38"), background
    tab.assert_clean()


def test_page_fixes_seen_as_a_new_user_would(world, browser, tmp_path):
    """Control characters as escapes, links to latents without a page, windows that open to more context,
    index headers that explain themselves and sort from the keyboard, "too few firings" ranked last."""
    board = copy.deepcopy(world["board"])
    keep = [p["id"] for p in board.latents[:4]]
    board.latents = [p for p in board.latents if p["id"] in keep]
    board.meta["latents"] = keep
    window = board.latents[0]["windows"]["top"][0]
    window["tokens"][0] = "a\x07b\x7f"
    site = write_site(board, tmp_path / "site", {"kind": "lm", "hook": HOOK})
    tab = Page(browser, (site / "index.html").as_uri() + f"#/latent/{keep[0]}")
    tab.page.wait_for_selector(".window")
    first = tab.page.locator(".window").first
    assert first.locator(".tok").first.text_content() == "a\\x07b\\x7f"
    context = first.locator(".ctx")
    assert context.count() == len(window["before"]) + len(window["after"]) > 0
    assert context.first.is_hidden()
    first.click()
    assert "expanded" in first.get_attribute("class") and context.first.is_visible()
    no_page = tab.page.locator(".no-page")
    assert no_page.count() >= 1 and "(no page)" in no_page.first.text_content()
    tab.page.goto((site / "index.html").as_uri())
    tab.page.wait_for_selector("table.latents tbody tr")
    header = tab.page.locator("th[data-key='totalLo']")
    assert "lower end" in header.get_attribute("title")
    header.focus()
    tab.page.keyboard.press("Enter")
    assert "sorted" in tab.page.locator("th[data-key='totalLo']").get_attribute("class")
    shown = [int(t.lstrip("#")) for t in tab.page.locator("table.latents tbody tr td:first-child").all_text_contents()]
    too_few = {p["id"] for p in board.latents if p["importance"]["too_few"]}
    assert [i for i in shown if i in too_few] == shown[len(shown) - len(too_few) :]  # last, whatever the sort
    tab.assert_clean()


def test_live_view_from_disk_explains_it_needs_the_server(world, browser):
    tab = Page(browser, (world["site"] / "index.html").as_uri() + "#/live")
    tab.page.wait_for_selector(".note")
    assert "saelab serve" in tab.page.locator(".note").text_content()
    tab.assert_clean()


def test_single_file_export_runs_under_its_own_csp(world, browser, tmp_path):
    board = world["board"]
    ids = [board.latents[0]["id"], board.latents[3]["id"]]
    out = export_html(world["site"], ids, tmp_path / "share.html")
    tab = Page(browser, out.as_uri())
    tab.page.wait_for_selector("table.latents tbody tr")
    assert tab.page.locator("table.latents tbody tr").count() == 2
    tab.page.click(f"a[href='#/latent/{ids[1]}']")
    tab.page.wait_for_selector(".window")
    _, data = read_data_script(world["site"] / "data" / "latents" / f"{ids[1]}.js")
    windows = data["windows"]["top"] + [w for iv in data["windows"]["intervals"] for w in iv["windows"]]
    assert window_texts(tab.page) == [w["tokens"] for w in windows]
    tab.assert_clean()  # no CSP violation either: the inline script and style match their hashes
