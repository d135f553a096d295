/* saelab dashboard: renders a dashboard folder written by `saelab dashboard`.
 *
 * No framework and no network. Data arrive as small script files (data/index.js, data/latents/N.js) that call
 * SAELAB.receive(key, data) — script tags load from file:// where fetch() cannot — or, in a single-file export,
 * as JSON in a script element of type application/json (id saelab-data). Latent pages load lazily, one file each.
 *
 * Security rule: every string that comes from data (token text above all) reaches the page through textContent,
 * createTextNode or setAttribute — never innerHTML — so no token can become markup or script.
 */
(function () {
  "use strict";

  // ------------------------------------------------------------------------------------------------ data

  const store = Object.create(null); // key -> data
  const waiting = Object.create(null); // key -> [[resolve, reject], ...]
  const SAELAB = (window.SAELAB = window.SAELAB || {});

  SAELAB.receive = function (key, data) {
    store[key] = data;
    (waiting[key] || []).forEach((w) => w[0](data));
    delete waiting[key];
  };

  const EMBEDDED = (function () {
    const node = document.getElementById("saelab-data");
    if (!node) return false;
    const data = JSON.parse(node.textContent);
    store.index = data.index;
    Object.keys(data.latents).forEach((id) => (store["latent:" + id] = data.latents[id]));
    return true;
  })();

  function load(key, src) {
    if (key in store) return Promise.resolve(store[key]);
    if (EMBEDDED) return Promise.reject(new Error("this export does not include " + key.replace(":", " ")));
    return new Promise((resolve, reject) => {
      const first = !(key in waiting);
      (waiting[key] = waiting[key] || []).push([resolve, reject]);
      if (!first) return;
      const script = document.createElement("script");
      script.src = src;
      const fail = () => {
        const ws = waiting[key] || [];
        delete waiting[key];
        ws.forEach((w) => w[1](new Error("cannot load " + src)));
      };
      script.onerror = fail;
      script.onload = () => {
        script.remove();
        if (key in waiting) fail();
      };
      document.head.appendChild(script);
    });
  }
  const loadIndex = () => load("index", "data/index.js");
  const loadLatent = (id) => load("latent:" + id, "data/latents/" + id + ".js");

  // ------------------------------------------------------------------------------------------------ DOM

  function h(tag, props, children) {
    const node = document.createElement(tag);
    setProps(node, props);
    append(node, children);
    return node;
  }

  function setProps(node, props) {
    for (const key of Object.keys(props || {})) {
      const value = props[key];
      if (value == null || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key === "class") node.setAttribute("class", value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
  }

  function append(node, children) {
    for (const child of [].concat(children == null ? [] : children)) {
      if (child == null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, props, children) {
    const node = document.createElementNS(SVG, tag);
    setProps(node, props);
    append(node, children);
    return node;
  }

  const app = () => document.getElementById("app");
  function show(children) {
    hideTooltip();
    const root = app();
    root.replaceChildren();
    append(root, children);
    window.scrollTo(0, 0);
  }

  function num(x, digits) {
    if (x == null || Number.isNaN(x)) return "–";
    if (x === 0) return "0";
    const a = Math.abs(x);
    if (a >= 1e5 || a < 1e-3) return x.toExponential((digits || 3) - 1);
    return String(Number(x.toPrecision(digits || 3)));
  }
  function percent(x) {
    if (x == null) return "–";
    return x === 0 ? "0%" : num(100 * x, 3) + "%";
  }
  function signed(x, digits) {
    return x == null ? "–" : (x > 0 ? "+" : "") + num(x, digits);
  }
  const link = (id, text) => h("a", { href: "#/latent/" + Number(id), text: text == null ? "#" + id : text });
  /* A token in a table cell. Whitespace and invisible characters get a visible stand-in drawn by CSS (data-show),
     so the chip's text stays exactly the token. */
  function chip(text) {
    const node = h("span", { class: "chip", title: JSON.stringify(text), text: escapeControls(text) });
    if (/^[\s\p{Cf}]*$/u.test(text)) {
      node.classList.add("ws");
      const show = Array.from(text, (c) => ({ " ": "␣", "\n": "↵", "\t": "⇥" })[c] || "U+" + c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0"));
      node.setAttribute("data-show", show.join("") || "∅");
    }
    return node;
  }

  /* About n round tick values covering [lo, hi]. */
  function ticks(lo, hi, n) {
    const raw = (hi - lo) / n;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    return out;
  }

  function stat(label, value, extra) {
    return h("div", { class: "stat" }, [
      h("div", { class: "label", text: label }),
      h("div", { class: "value" }, [value, extra ? h("small", { text: " " + extra }) : null]),
    ]);
  }

  // ------------------------------------------------------------------------------------------------ tooltip

  let tip = null;
  function showTooltip(event, rows, title) {
    if (!tip) {
      tip = h("div", { class: "tooltip", role: "tooltip" });
      document.body.append(tip);
    }
    tip.replaceChildren();
    if (title != null) tip.append(h("div", { class: "t", text: title }));
    const table = h("table");
    rows.forEach((r) => table.append(h("tr", {}, [h("td", { text: r[0] }), h("td", { text: r[1] })])));
    tip.append(table);
    tip.style.display = "block";
    const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    const y = event.clientY + 18 + tip.offsetHeight > window.innerHeight ? event.clientY - tip.offsetHeight - 10 : event.clientY + 18;
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }
  function hideTooltip() {
    if (tip) tip.style.display = "none";
  }

  // ------------------------------------------------------------------------------------------------ tokens

  const INVISIBLE = /^[\p{Cf}\p{Zl}\p{Zp}]+$/u;
  const CONTROL = /[\u0000-\u0008\u000b-\u001f\u007f]/g; // C0 controls but newline and tab, and DEL

  /* Control characters have no glyph (a blank box at best): write them as visible escapes, \x07. */
  function escapeControls(text) {
    return text.replace(CONTROL, (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));
  }

  /* One token as a span whose text is exactly the token's text; colour comes from data, never markup. */
  function tokenSpan(text, opts) {
    const shown = escapeControls(text);
    const span = h("span", { class: "tok", text: shown });
    if (shown !== text) span.classList.add("ctrl");
    if (text === "") span.classList.add("empty");
    else if (INVISIBLE.test(text)) {
      // Format characters (RTL marks, zero-width spaces, …) have no glyph: show their code points beside them.
      span.classList.add("invisible");
      span.setAttribute("data-code", Array.from(text, (c) => "U+" + c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")).join(" "));
    }
    if (text.endsWith("\n") && text.trim() === "") span.classList.add("nl");
    if (opts.background) span.style.backgroundColor = opts.background;
    if (opts.underline) span.style.borderBottomColor = opts.underline;
    if (opts.center) span.classList.add("center");
    if (opts.rows) {
      span.addEventListener("mouseenter", (e) => showTooltip(e, opts.rows, JSON.stringify(text)));
      span.addEventListener("mouseleave", hideTooltip);
    }
    if (opts.onclick) span.addEventListener("click", opts.onclick);
    return span;
  }

  const actColor = (a, max) => (a > 0 && max > 0 ? "rgba(234,120,20," + Math.min(1, 0.12 + (0.88 * a) / max).toFixed(3) + ")" : null);
  function lossColor(d, max) {
    if (d == null || !(max > 0)) return null;
    const alpha = Math.min(1, 0.15 + (0.85 * Math.abs(d)) / max).toFixed(3);
    return d > 0 ? "rgba(37,99,235," + alpha + ")" : "rgba(220,38,38," + alpha + ")";
  }

  function windowView(win, scale, mode) {
    const div = h("div", { class: "window", dir: "ltr", title: "click for more context" });
    div.append(h("span", { class: "meta", text: "seq " + win.seq + " · pos " + (win.start + win.center) }));
    const before = win.before || [], after = win.after || [];
    const more = (texts) => texts.map((text) => h("span", { class: "ctx", text: escapeControls(text) }));
    if (before.length || after.length) {
      div.addEventListener("click", () => div.classList.toggle("expanded"));
      div.append(h("span", { class: "more" }, more(before)));
    }
    win.tokens.forEach((text, i) => {
      const a = win.acts[i];
      const loss = win.loss[i];
      const direct = win.direct[i];
      const next = i + 1 < win.tokens.length ? win.tokens[i + 1] : after[0];
      const rows = [
        ["position", String(win.start + i)],
        ["activation", num(a, 4)],
      ];
      if (win.labels) { // a zoo task: the loss scores the task's label here, not the next token
        rows.push(["label", win.labels[i] == null ? "not scored" : win.labels[i]]);
      } else if (next != null) rows.push(["next token", JSON.stringify(next)]);
      if (win.logit && win.logit[i] != null) rows.push(["its logit change", signed(win.logit[i], 4)]);
      if (loss != null) rows.push(["ΔCE here (exact)", signed(loss, 4)]);
      if (direct != null) rows.push(["ΔCE here (direct path)", signed(direct, 4)]);
      if (win.grad && win.grad[i] != null) rows.push(["total ΔCE (gradient)", signed(win.grad[i], 4)]);
      const opts = { rows: rows, center: i === win.center };
      if (mode === "loss") opts.background = lossColor(loss, scale.loss);
      else {
        opts.background = actColor(a, scale.act);
        opts.underline = lossColor(loss, scale.loss);
      }
      div.append(tokenSpan(text, opts));
    });
    if (after.length) div.append(h("span", { class: "more" }, more(after)));
    return div;
  }

  // ------------------------------------------------------------------------------------------------ charts

  /* Activation histogram: the site stores counts on fine log-spaced bins; draw them re-binned. */
  function histogram(hist, meta, options) {
    const width = 560, height = 214, pad = { l: 44, r: 10, t: 8, b: 42 }; // room for tick labels and the axis title
    const chart = svg("svg", { class: "chart", viewBox: "0 0 " + width + " " + height, role: "img" });
    if (!hist) {
      chart.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", text: "never fires" }));
      return chart;
    }
    const per = meta.bins_per_decade, lo = meta.log10_lo;
    const center = (i) => Math.pow(10, lo + (hist.first + i + 0.5) / per);
    const values = hist.counts.map((c, i) => [center(i), c]).filter((v) => v[1] > 0);
    const vmin = values[0][0], vmax = values[values.length - 1][0];
    const nbins = 48;
    const logx = options.logx && vmax > vmin;
    const tx = logx ? Math.log10 : (v) => v;
    const x0 = logx ? tx(vmin) : 0, x1 = tx(vmax) + (logx ? 1e-9 : 0) || 1;
    const bins = new Array(nbins).fill(0);
    values.forEach(([v, c]) => {
      const b = Math.min(nbins - 1, Math.max(0, Math.floor(((tx(v) - x0) / (x1 - x0)) * nbins)));
      bins[b] += c;
    });
    const ty = options.logy ? (c) => (c > 0 ? Math.log10(c) + 1 : 0) : (c) => c;
    const ymax = Math.max.apply(null, bins.map(ty)) || 1;
    const W = width - pad.l - pad.r, H = height - pad.t - pad.b;
    bins.forEach((c, i) => {
      if (!c) return;
      const bh = (ty(c) / ymax) * H;
      const bar = svg("rect", { class: "bar", x: pad.l + (i * W) / nbins + 0.5, y: pad.t + H - bh, width: Math.max(1, W / nbins - 1), height: bh });
      const a = x0 + ((x1 - x0) * i) / nbins, b = x0 + ((x1 - x0) * (i + 1)) / nbins;
      const range = logx ? [Math.pow(10, a), Math.pow(10, b)] : [a, b];
      bar.append(svg("title", { text: num(range[0]) + " – " + num(range[1]) + ": " + c + " tokens" }));
      chart.append(bar);
    });
    chart.append(svg("line", { class: "axis", x1: pad.l, x2: width - pad.r, y1: pad.t + H, y2: pad.t + H }));
    chart.append(svg("line", { class: "axis", x1: pad.l, x2: pad.l, y1: pad.t, y2: pad.t + H }));
    const X = (v) => pad.l + ((v - x0) / (x1 - x0)) * W;
    const decades = ticks(x0, x1, 4).filter((v) => Number.isInteger(v));
    (logx && decades.length >= 2 ? decades : ticks(x0, x1, 5)).forEach((v) => {
      const label = logx ? num(Math.pow(10, v), 2) : num(v, 2);
      chart.append(svg("line", { class: "axis", x1: X(v), x2: X(v), y1: pad.t + H, y2: pad.t + H + 4 }));
      chart.append(svg("text", { x: X(v), y: pad.t + H + 16, "text-anchor": "middle", text: label }));
    });
    const ytop = options.logy ? Math.round(Math.pow(10, ymax - 1)) : ymax;
    chart.append(svg("text", { x: pad.l - 6, y: pad.t + 8, "text-anchor": "end", text: String(ytop) }));
    chart.append(svg("text", { x: pad.l - 6, y: pad.t + H, "text-anchor": "end", text: "0" }));
    chart.append(svg("text", { x: pad.l + W / 2, y: height - 6, "text-anchor": "middle", text: "activation" + (logx ? " (log scale)" : "") }));
    return chart;
  }

  /* Importance (mean ΔCE where the latent fires) against firing density, one point per latent, on a canvas. */
  function scatter(rows, onPick, caption) {
    const canvas = h("canvas", { class: "scatter", "aria-label": "importance against density" });
    const pts = rows.filter((r) => r.density > 0 && r.imp != null && !r.tooFew);
    const draw = () => {
      const dpr = window.devicePixelRatio || 1;
      const W = canvas.clientWidth, H = canvas.clientHeight;
      if (!W) return;
      canvas.width = W * dpr;
      canvas.height = H * dpr;
      const ctx = canvas.getContext("2d");
      ctx.scale(dpr, dpr);
      const pad = { l: 56, r: 14, t: 10, b: 36 };
      const xs = pts.map((p) => Math.log10(p.density));
      const ys = pts.map((p) => p.imp).concat(pts.map((p) => (p.lo != null ? p.lo : p.imp)), pts.map((p) => (p.hi != null ? p.hi : p.imp)));
      let x0 = Math.floor(Math.min.apply(null, xs.concat([-1]))), x1 = Math.ceil(Math.max.apply(null, xs.concat([0])));
      let y0 = Math.min.apply(null, ys.concat([0])), y1 = Math.max.apply(null, ys.concat([0]));
      if (y1 - y0 < 1e-9) { y0 -= 1; y1 += 1; }
      const m = (y1 - y0) * 0.06; y0 -= m; y1 += m;
      const X = (v) => pad.l + ((v - x0) / (x1 - x0)) * (W - pad.l - pad.r);
      const Y = (v) => pad.t + (1 - (v - y0) / (y1 - y0)) * (H - pad.t - pad.b);
      ctx.font = "10px system-ui, sans-serif";
      ctx.fillStyle = "#68717d";
      ctx.strokeStyle = "#e2e6eb";
      ctx.lineWidth = 1;
      for (let d = x0; d <= x1; d++) {
        ctx.beginPath(); ctx.moveTo(X(d), pad.t); ctx.lineTo(X(d), H - pad.b); ctx.stroke();
        ctx.textAlign = "center";
        ctx.fillText(percent(Math.pow(10, d)), X(d), H - pad.b + 14);
      }
      ticks(y0, y1, 5).forEach((v) => {
        ctx.beginPath(); ctx.moveTo(pad.l, Y(v)); ctx.lineTo(W - pad.r, Y(v)); ctx.stroke();
        ctx.textAlign = "right";
        ctx.fillText(num(v, 2), pad.l - 6, Y(v) + 3);
      });
      ctx.strokeStyle = "#9aa3ad";
      ctx.beginPath(); ctx.moveTo(pad.l, Y(0)); ctx.lineTo(W - pad.r, Y(0)); ctx.stroke();
      ctx.textAlign = "center";
      ctx.fillText("firing density (log scale)", pad.l + (W - pad.l - pad.r) / 2, H - 6);
      ctx.save(); ctx.translate(12, pad.t + (H - pad.t - pad.b) / 2); ctx.rotate(-Math.PI / 2);
      ctx.fillText("total " + LOSS + " per firing", 0, 0); ctx.restore();
      const r = pts.length > 4000 ? 1.6 : pts.length > 500 ? 2.4 : 3.4;
      pts.forEach((p) => {
        p.px = X(Math.log10(p.density));
        p.py = Y(p.imp);
        ctx.fillStyle = p.imp >= 0 ? "rgba(37,99,235,.6)" : "rgba(220,38,38,.6)";
        if (p.lo != null && p.hi != null) {
          ctx.strokeStyle = p.imp >= 0 ? "rgba(37,99,235,.35)" : "rgba(220,38,38,.35)";
          ctx.beginPath(); ctx.moveTo(p.px, Y(p.lo)); ctx.lineTo(p.px, Y(p.hi)); ctx.stroke();
        }
        ctx.beginPath(); ctx.arc(p.px, p.py, r, 0, 2 * Math.PI); ctx.fill();
      });
    };
    const nearest = (e) => {
      const box = canvas.getBoundingClientRect();
      const x = e.clientX - box.left, y = e.clientY - box.top;
      let best = null, bd = 64;
      pts.forEach((p) => {
        const d = (p.px - x) * (p.px - x) + (p.py - y) * (p.py - y);
        if (d < bd) { bd = d; best = p; }
      });
      return best;
    };
    canvas.addEventListener("mousemove", (e) => {
      const p = nearest(e);
      if (!p) return hideTooltip();
      showTooltip(e, [["density", percent(p.density)], ["per firing", signed(p.imp, 3) + " [" + num(p.lo, 3) + ", " + num(p.hi, 3) + "]"], ["per token", signed(p.total, 3)], ["firings", p.firings + " in " + p.contexts + " contexts"]], "latent " + p.id);
    });
    canvas.addEventListener("mouseleave", hideTooltip);
    canvas.addEventListener("click", (e) => {
      const p = nearest(e);
      if (p) onPick(p.id);
    });
    requestAnimationFrame(draw);
    window.addEventListener("resize", draw);
    return canvas;
  }

  // ------------------------------------------------------------------------------------------------ index

  const state = { sort: "total", desc: true, query: "", page: 0, perPage: 100 };
  let LOSS = "ΔCE"; // toy-model sites measure the toy model's own loss instead of next-token cross-entropy

  function indexRows(index) {
    const c = index.columns;
    return c.id.map((id, i) => ({
      id: id,
      density: c.density[i],
      max: c.max[i],
      imp: c.importance[i],
      lo: c.importance_lo[i],
      hi: c.importance_hi[i],
      total: c.total[i],
      totalLo: c.total_lo ? c.total_lo[i] : null,
      totalHi: c.total_hi ? c.total_hi[i] : null,
      tooFew: c.too_few ? c.too_few[i] : false,
      firings: c.firings ? c.firings[i] : null,
      contexts: c.contexts ? c.contexts[i] : null,
      raises: c.raises_loss ? c.raises_loss[i] : null,
      hit: c.next_token_top10 ? c.next_token_top10[i] : null,
      fires: c.fires_on[i] || [],
      promotes: c.promotes[i] || [],
      gt: c.ground_truth ? c.ground_truth[i] : null,
    }));
  }

  function header(index) {
    const m = index.meta;
    LOSS = m.kind === "toy" ? "Δloss" : "ΔCE";
    document.body.classList.toggle("task-tokens", !!m.task); // a zoo task's tokens are words: space them apart
    const sub = document.getElementById("subtitle");
    if (sub) sub.textContent = m.model + " · " + m.hook;
    const live = document.getElementById("nav-live");
    if (live && (m.kind === "toy" || EMBEDDED)) live.remove(); // no model behind a toy site or an exported file
  }

  function summaryPanel(index) {
    const m = index.meta;
    const figures = [
      stat("latents shown", String(m.latents.length), "of " + m.sae.d_sae),
      stat("architecture", m.sae.architecture, "d_in " + m.sae.d_in),
    ];
    if (m.kind === "lm") {
      figures.push(stat("tokens", String(m.tokens.counted), m.tokens.sequences + " × " + m.tokens.length + (m.tokens.documents ? " from " + m.tokens.documents + " documents" : "")));
      const a = (m.approximation || {}).direct_path || {};
      if (a.mean_abs_error != null) {
        figures.push(stat("direct-path error", num(a.mean_abs_error, 3), "mean |error| vs same-position ΔCE (mean |ΔCE| " + num(a.mean_abs_exact, 3) + "), r = " + num(a.pearson_r, 3) + ", " + a.positions + " positions"));
      }
      const g = (m.approximation || {}).gradient || {};
      if (g.mean_abs_error != null) {
        figures.push(stat("gradient error", num(g.mean_abs_error, 3), "mean |error| vs total ΔCE (mean |ΔCE| " + num(g.mean_abs_exact, 3) + "), r = " + num(g.pearson_r, 3) + ", " + g.positions + " firings"));
      }
    } else {
      figures.push(stat("samples", String(m.tokens.counted), "toy inputs"));
      if (m.ground_truth) figures.push(stat("features recovered", String(m.ground_truth.recovered), "of " + m.ground_truth.n_features + " at cos ≥ 0.9"));
    }
    return h("section", { class: "panel" }, [
      h("h1", { text: m.kind === "toy" ? "Toy-model SAE" : "SAE latents" }),
      h("div", { class: "muted" }, [h("span", { class: "mono", text: m.hook }), " of ", h("span", { class: "mono", text: m.model })]),
      h("div", { class: "stats" }, figures),
      m.task ? taskVariable(m.task, new Set(m.latents)) : null,
    ]);
  }

  /* A zoo model: the task, and the latent that tracks each value of its intermediate variable best. */
  function taskVariable(task, known) {
    return h("div", { id: "task-variable" }, [
      h("h2", { text: "Task: " + task.name }),
      h("p", { class: "muted small", text: task.summary + ". Losses are the task's, on its scored positions only. Best-matching latent per value of " + task.variable + " (" + task.variable_description + "): the highest Pearson correlation of activation with it, where it is defined." }),
      h("table", {}, [
        h("thead", {}, h("tr", {}, ["value", "latent", "correlation"].map((t) => h("th", { text: t })))),
        h("tbody", {}, task.variable_latents.map((v) => h("tr", {}, [
          h("td", { class: "mono", text: v.value }), h("td", {}, known.has(v.latent) ? link(v.latent) : noPage(v.latent)), h("td", { class: "num", text: num(v.correlation, 3) }),
        ]))),
      ]),
    ]);
  }

  function showIndex() {
    loadIndex().then((index) => {
      header(index);
      const rows = indexRows(index);
      const tableBox = h("div");
      const search = h("input", { type: "search", placeholder: "Search latent id or token…", value: state.query, "aria-label": "search latents" });
      const render = () => renderTable(tableBox, rows, index);
      search.addEventListener("input", () => {
        state.query = search.value;
        state.page = 0;
        render();
      });
      render();
      const scatterPanel = h("section", { class: "panel" }, [
        h("h2", { text: "Importance against density" }),
        scatter(rows, (id) => (location.hash = "#/latent/" + id)),
        h("p", { class: "muted small", text: index.meta.kind === "toy"
          ? "Each point is a latent: how often it fires, and how much the toy model's reconstruction loss rises, on average, when its contribution is removed from the hidden state where it fires. Click a point to open it."
          : "Each point is a latent: how often it fires, and its importance per firing: the mean total ΔCE (the " + (index.meta.task ? "task's loss on its scored positions" : "next-token loss") + " summed over the firing position and every later position of its context, when the latent's contribution is removed at that position only), with its " + Math.round(100 * ((index.meta.config || {}).confidence || 0.95)) + " % interval over contexts. Latents with too few firings are left out. Click a point to open it." }),
      ]);
      show([summaryPanel(index), scatterPanel, h("section", { class: "panel" }, [h("div", { class: "controls" }, [search, h("span", { class: "muted small", text: "click a column to sort" })]), tableBox])]);
    }, failed);
  }

  const COLUMNS = [
    ["id", "Latent", "num", "latent id; click to open its page"],
    ["density", "Density", "num", "fraction of scanned tokens where the latent fires"],
    ["max", "Max act", "num", "largest activation in the scanned tokens"],
    ["total", "Per token", "num", "importance per token: total loss change summed over all firings / tokens scanned (the loss it saves per token), with its interval"],
    ["totalLo", "Lower bound", "num", "lower end of the per-token importance interval: sort by it to rank latents that surely matter"],
    ["imp", "Per firing", "num", "importance per firing: mean total loss change when the latent is removed at one firing, with its interval"],
    ["firings", "Firings", "num", "firings where removing the latent can change the loss (a counted next token follows; on a zoo task, every position), and the contexts they are in"],
    ["raises", "Helps", "num", "fraction of exactly computed firings where removing the latent raises the loss (– below 10 exact firings; the latent's page shows the count)"],
    ["hit", "Next in top 10", "num", "how often the actual next token is among the latent's 10 most promoted tokens"],
    ["fires", "Fires on", "", "tokens at the centre of the top windows"],
    ["promotes", "Promotes", "", "tokens (a zoo task's outputs) whose logits the latent raises most"],
    ["gt", "Ground truth", "", "the true toy feature whose direction the decoder row matches"],
  ];
  const RANKED = new Set(["total", "totalLo", "imp", "raises"]);

  function renderTable(box, rows, index) {
    const toy = index.meta.kind === "toy";
    const task = !!index.meta.task; // a zoo task's outputs are not next tokens: no "next in top 10"
    const cols = COLUMNS.filter((c) => (toy ? !["fires", "promotes", "hit", "raises"].includes(c[0]) : c[0] !== "gt" && !(task && c[0] === "hit")));
    const q = state.query.trim().toLowerCase();
    let shown = rows;
    if (q) {
      shown = /^#?\d+$/.test(q)
        ? rows.filter((r) => String(r.id).startsWith(q.replace("#", "")))
        : rows.filter((r) => r.fires.concat(r.promotes).some((t) => t.toLowerCase().includes(q)));
    }
    const key = state.sort;
    const value = (r) => (key === "gt" ? (r.gt ? r.gt[1] : null) : key === "fires" || key === "promotes" ? (r[key][0] || "") : r[key]);
    shown = shown.slice().sort((a, b) => {
      if (RANKED.has(key) && a.tooFew !== b.tooFew) return a.tooFew ? 1 : -1; // too few firings: last, not ranked
      const va = value(a), vb = value(b);
      if (va == null && vb == null) return a.id - b.id;
      if (va == null) return 1;
      if (vb == null) return -1;
      const c = va < vb ? -1 : va > vb ? 1 : a.id - b.id;
      return state.desc ? -c : c;
    });
    const pages = Math.max(1, Math.ceil(shown.length / state.perPage));
    state.page = Math.min(state.page, pages - 1);
    const page = shown.slice(state.page * state.perPage, (state.page + 1) * state.perPage);
    const head = h("tr", {}, cols.map((c) => {
      const mark = c[0] === key ? (state.desc ? " ▼" : " ▲") : "";
      const sortBy = () => {
        state.desc = state.sort === c[0] ? !state.desc : c[0] !== "id";
        state.sort = c[0];
        renderTable(box, rows, index);
        const again = box.querySelector("th[data-key='" + c[0] + "']");
        if (again) again.focus();
      };
      return h("th", {
        class: (c[2] + (c[0] === key ? " sorted" : "")).trim() || null,
        text: c[1] + mark,
        title: c[3],
        tabindex: "0",
        "data-key": c[0],
        "aria-sort": c[0] === key ? (state.desc ? "descending" : "ascending") : null,
        onclick: sortBy,
        onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(); } },
      });
    }));
    const body = page.map((r) => h("tr", {}, cols.map((c) => cell(c[0], r))));
    const pager = h("div", { class: "pager" }, [
      h("span", { text: shown.length + " latents · page " + (state.page + 1) + " of " + pages }),
      h("button", { text: "‹ Prev", disabled: state.page === 0 ? "" : null, onclick: () => { state.page--; renderTable(box, rows, index); } }),
      h("button", { text: "Next ›", disabled: state.page >= pages - 1 ? "" : null, onclick: () => { state.page++; renderTable(box, rows, index); } }),
    ]);
    box.replaceChildren(h("table", { class: "latents" }, [h("thead", {}, head), h("tbody", {}, body)]), pager);
  }

  function cell(key, r) {
    switch (key) {
      case "id": return h("td", { class: "num" }, link(r.id));
      case "density": return h("td", { class: "num", text: percent(r.density) });
      case "max": return h("td", { class: "num", text: num(r.max) });
      case "imp": return r.tooFew ? h("td", { class: "num muted", text: "too few firings" }) : h("td", { class: "num" }, [signed(r.imp), r.lo != null ? h("div", { class: "ci", text: "[" + num(r.lo, 2) + ", " + num(r.hi, 2) + "]" }) : null]);
      case "total": return r.tooFew ? h("td", { class: "num muted", text: "too few firings" }) : h("td", { class: "num" }, [signed(r.total), r.totalLo != null ? h("div", { class: "ci", text: "[" + num(r.totalLo, 2) + ", " + num(r.totalHi, 2) + "]" }) : null]);
      case "totalLo": return h("td", { class: "num", text: r.tooFew ? "–" : signed(r.totalLo) });
      case "firings": return h("td", { class: "num" }, [String(r.firings == null ? "–" : r.firings), r.contexts != null ? h("div", { class: "ci", text: r.contexts + " contexts" }) : null]);
      case "raises": return h("td", { class: "num", text: r.raises == null ? "–" : percent(r.raises) });
      case "hit": return h("td", { class: "num", text: r.hit == null ? "–" : percent(r.hit) });
      case "fires": return h("td", {}, h("div", { class: "chips" }, r.fires.map(chip)));
      case "promotes": return h("td", {}, h("div", { class: "chips" }, r.promotes.map(chip)));
      case "gt": return h("td", { class: "gt", text: r.gt ? "feature " + r.gt[0] + " · cos " + num(r.gt[1], 3) : "–" });
    }
    return h("td");
  }

  function failed(err) {
    show(h("div", { class: "error", text: String(err && err.message ? err.message : err) }));
  }

  // ------------------------------------------------------------------------------------------------ latent

  const view = { mode: "act", logy: false, logx: false };

  function showLatent(id) {
    Promise.all([loadIndex(), loadLatent(id)]).then(([index, data]) => {
      header(index);
      renderLatent(index, data);
    }, failed);
  }

  function renderLatent(index, d) {
    const ids = index.meta.latents;
    const known = new Set(ids);
    const at = ids.indexOf(d.id);
    const nav = h("div", { class: "small" }, [
      at > 0 ? link(ids[at - 1], "‹ #" + ids[at - 1]) : null,
      at > 0 && at < ids.length - 1 ? "  ·  " : null,
      at < ids.length - 1 ? link(ids[at + 1], "#" + ids[at + 1] + " ›") : null,
    ]);
    const imp = d.importance || {};
    const figures = [
      stat("density", percent(d.density), d.count + " tokens"),
      stat("max activation", num(d.max)),
      stat("mean when firing", num(d.mean)),
    ];
    (d.quantiles || []).forEach((q) => figures.push(stat("p" + Math.round(q[0] * 100), num(q[1]))));
    if (imp.firings) {
      const level = Math.round(100 * (imp.confidence || 0.95)) + " % CI ";
      const ci = (x) => (x.lo != null ? level + "[" + num(x.lo, 3) + ", " + num(x.hi, 3) + "]" : "no interval");
      const how = imp.firings + " firings in " + imp.contexts + " contexts; " + (imp.method === "exact" ? "all computed exactly" : imp.exact + " exact, the rest by gradient attribution corrected by them");
      if (imp.too_few) figures.push(stat("importance", "too few firings", how));
      figures.push(stat("importance per firing", signed(imp.per_firing.mean), ci(imp.per_firing) + " · mean total " + LOSS));
      figures.push(stat("importance per token", signed(imp.per_token.mean), ci(imp.per_token) + " · " + how));
      if (imp.sampling_share != null && imp.method !== "exact") {
        const sampled = Math.round(100 * imp.sampling_share);
        figures.push(stat("interval from sampling", sampled + " %", "of the interval's variance comes from sampling the exact firings (more --exact-firings narrow it), the rest from context-to-context variation (more tokens narrow it)"));
      }
    }
    const err = d.errors || {};
    if (err.direct_path != null) figures.push(stat("direct-path error", num(err.direct_path), "mean |Δ| vs same-position " + LOSS));
    if (err.gradient != null) figures.push(stat("gradient error", num(err.gradient), "mean |Δ| vs total " + LOSS));
    const title = h("section", { class: "panel" }, [
      h("div", { class: "title-row" }, [h("h1", { text: "Latent " + d.id }), nav]),
      d.ground_truth ? h("div", { class: "badge", text: "matches ground-truth feature " + d.ground_truth.feature + " (cos " + num(d.ground_truth.cosine, 3) + ")" }) : null,
      h("div", { class: "stats" }, figures),
    ]);

    const histBox = h("div");
    const drawHist = () => histBox.replaceChildren(histogram(d.hist, index.meta.histogram, view));
    drawHist();
    const toggles = h("div", { class: "controls" }, [
      checkbox("log density", view.logy, (v) => { view.logy = v; drawHist(); }),
      checkbox("log activation", view.logx, (v) => { view.logx = v; drawHist(); }),
    ]);
    const histPanel = h("section", { class: "panel" }, [h("h2", { text: "Activation histogram (non-zero)" }), toggles, histBox]);

    const panels = [title];
    const side = d.logits ? logitPanel(d.logits, index.meta.task) : d.ground_truth ? groundTruthPanel(d.ground_truth) : null;
    panels.push(side ? h("div", { class: "grid two" }, [histPanel, side]) : histPanel);
    if (d.ground_truth) panels.push(inputsPanel(d.ground_truth));
    if (d.helps) panels.push(helpsPanel(d.helps, index.meta.task));
    panels.push(h("div", { class: "grid two" }, [
      listPanel("Nearest by decoder cosine", d.neighbours, "cos", known),
      listPanel("Most correlated activations", d.correlated, "r", known),
    ]));
    if (d.windows) panels.push(windowsPanel(d));
    show(panels);
  }

  function checkbox(label, checked, onchange) {
    const box = h("input", { type: "checkbox" });
    box.checked = checked;
    box.addEventListener("change", () => onchange(box.checked));
    return h("label", { class: "toggle" }, [box, label]);
  }

  function logitPanel(logits, task) {
    // Coloured by sign: with few outputs (a zoo task) the least raised ones may still be raised.
    const table = (entries) => h("table", { class: "logits" }, entries.map((e) => h("tr", {}, [
      h("td", {}, chip(e[0])),
      h("td", { class: "num " + (e[1] < 0 ? "neg" : "pos"), text: signed(e[1], 3) }),
    ])));
    const what = task ? "the task's output logits (" + task.name + " outputs, each listed once)" : "logits";
    const caveat = task ? " Only differences between outputs matter to the softmax, so an output raised less than the others is suppressed relative to them." : "";
    return h("section", { class: "panel", id: "logit-effects" }, [
      h("h2", { text: task ? "Output logit effects" : "Logit effects" }),
      h("p", { class: "muted small", text: "Mean change in " + what + " from the latent's contribution, through the model's final norm at the actual residual, over " + logits.positions + " firing positions." + caveat }),
      h("div", { class: "grid two" }, [
        h("div", {}, [h("div", { class: "small muted", text: "promoted" }), table(logits.top)]),
        h("div", {}, [h("div", { class: "small muted", text: "suppressed" }), table(logits.bottom)]),
      ]),
    ]);
  }

  function helpsPanel(helps, task) {
    const rows = helps.intervals.map((iv) => h("tr", {}, [
      h("td", { class: "num", text: Math.round(iv.q[0] * 100) + "–" + Math.round(iv.q[1] * 100) + "%" }),
      h("td", { class: "num", text: num(iv.lo) + " – " + num(iv.hi) }),
      h("td", { class: "num", text: String(iv.firings) }),
      h("td", { class: "num", text: iv.mean_total == null ? "–" : signed(iv.mean_total, 3) }),
    ]));
    return h("section", { class: "panel" }, [
      h("h2", { text: "When does it help?" }),
      h("div", { class: "stats" }, [
        stat("removing it raises the loss", helps.raises_loss == null ? "–" : percent(helps.raises_loss), "of " + helps.raises_loss_n + " exactly computed firings"),
        task ? null : stat("next token among its top 10", helps.next_token_in_top10 == null ? "–" : percent(helps.next_token_in_top10), "of its firings"),
      ]),
      h("table", { class: "logits" }, [
        h("thead", {}, h("tr", {}, ["activation quantiles", "activation", "firings", "mean total " + LOSS].map((t) => h("th", { text: t })))),
        h("tbody", {}, rows),
      ]),
    ]);
  }

  /* A latent without a page on this site: say so rather than link to nothing. */
  function noPage(id) {
    return h("span", { class: "muted no-page", title: "no page: this site was built for other latents (saelab dashboard --features)", text: "#" + id + " (no page)" });
  }

  function listPanel(title, entries, label, known) {
    const items = (entries || []).map((e) => h("li", {}, [
      known.has(e[0]) ? link(e[0]) : noPage(e[0]),
      h("span", { class: "mono", text: label + " " + num(e[1], 3) }),
    ]));
    return h("section", { class: "panel" }, [h("h2", { text: title }), items.length ? h("ul", { class: "plain" }, items) : h("p", { class: "muted", text: "none" })]);
  }

  const featureList = (entries, label) => h("ul", { class: "plain" }, (entries || []).map((e) => h("li", {}, [
    h("span", { text: "feature " + e[0] }),
    h("span", { class: "mono", text: label + " " + num(e[1], 3) }),
  ])));

  function groundTruthPanel(gt) {
    return h("section", { class: "panel" }, [
      h("h2", { text: "Ground-truth features by decoder cosine" }),
      h("p", { class: "muted small", text: "Cosine between this latent's decoder row and the toy model's true feature directions (columns of W)." }),
      featureList(gt.top, "cos"),
    ]);
  }

  function inputsPanel(gt) {
    return h("section", { class: "panel" }, [
      h("h2", { text: "Input features when it fires" }),
      h("p", { class: "muted small", text: "Mean value of each true input feature over the samples where this latent fires." }),
      featureList(gt.inputs, "mean"),
    ]);
  }

  function windowsPanel(d) {
    const all = d.windows.top.concat(...d.windows.intervals.map((iv) => iv.windows));
    const scale = { act: d.max || 0, loss: 0 };
    all.forEach((w) => w.loss.forEach((x) => { if (x != null) scale.loss = Math.max(scale.loss, Math.abs(x)); }));
    const box = h("div");
    const render = () => {
      box.replaceChildren();
      box.append(h("h2", { text: "Top activations" }));
      if (!d.windows.top.length) box.append(h("p", { class: "muted", text: "never fires on these tokens" }));
      d.windows.top.forEach((w) => box.append(windowView(w, scale, view.mode)));
      d.windows.intervals.forEach((iv, i) => {
        if (!iv.windows.length) return;
        const label = "Quantile interval " + (i + 1) + " of " + d.windows.intervals.length + " (" + Math.round(iv.q[0] * 100) + "–" + Math.round(iv.q[1] * 100) + "% of firings): activation " + num(iv.lo) + " – " + num(iv.hi);
        const section = h("div", { class: "interval" }, h("h3", { text: label }));
        iv.windows.forEach((w) => section.append(windowView(w, scale, view.mode)));
        box.append(section);
      });
    };
    const modeBox = h("select", { "aria-label": "colour tokens by" }, [
      h("option", { value: "act", text: "colour: activation (underline: ΔCE)" }),
      h("option", { value: "loss", text: "colour: loss effect ΔCE" }),
    ]);
    modeBox.value = view.mode;
    modeBox.addEventListener("change", () => { view.mode = modeBox.value; render(); });
    render();
    const legend = h("div", { class: "legend" }, [
      h("span", {}, [h("span", { class: "swatch act" }), "activation"]),
      h("span", {}, [h("span", { class: "swatch help" }), "ΔCE > 0: removing the latent raises the loss (it helps)"]),
      h("span", {}, [h("span", { class: "swatch hurt" }), "ΔCE < 0: it hurts"]),
      h("span", { text: "hover a token for exact and direct-path values" }),
    ]);
    return h("section", { class: "panel" }, [h("div", { class: "controls" }, [modeBox]), legend, box]);
  }

  // ------------------------------------------------------------------------------------------------ live

  function showLive() {
    loadIndex().then((index) => {
      header(index);
      renderLive(index);
    }, () => renderLive(null));
  }

  function renderLive(index) {
    if (location.protocol === "file:" || EMBEDDED) {
      show(h("section", { class: "panel" }, [
        h("h1", { text: "Live prompt" }),
        h("p", { class: "note" }, ["The live view runs the model, so it needs the local server: ", h("span", { class: "mono", text: "saelab serve <this folder>" }), "."]),
      ]));
      return;
    }
    const known = new Set(index ? index.meta.latents : []);
    const task = index && index.meta.task;
    const text = h("textarea", { "aria-label": "prompt", placeholder: task ? "Type a task input: " + task.name + " tokens separated by spaces" : "Type a prompt…", spellcheck: "false" });
    text.value = sessionStorage.getItem("saelab-prompt") || (task ? task.example : "def hello(name):\n    print(\"hello\", name)\n");
    const button = h("button", { class: "primary", text: "Analyse" });
    const status = h("span", { class: "muted small" });
    const out = h("div", { id: "live-output" });
    const run = () => {
      sessionStorage.setItem("saelab-prompt", text.value);
      button.disabled = true;
      status.textContent = "running the model…";
      fetch("api/analyze", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text: text.value }) })
        .then((r) => r.json().then((body) => (r.ok ? body : Promise.reject(new Error(body.error || r.statusText)))))
        .then((result) => {
          status.textContent = result.tokens.length + " tokens · " + result.seconds + " s";
          liveState.result = result;
          liveState.prompt = text.value;
          liveState.token = null;
          renderLiveResult(out, result, known);
        })
        .catch((err) => { status.textContent = ""; out.replaceChildren(h("div", { class: "error", text: String(err.message || err) })); })
        .then(() => { button.disabled = false; });
    };
    button.addEventListener("click", run);
    text.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
    show([
      h("section", { class: "panel" }, [
        h("h1", { text: "Live prompt" }),
        h("p", { class: "muted small", text: task
          ? "Which latents fire at each position of a " + task.name + " input (its tokens separated by spaces), with activations and the model's answer there, computed by the model now; a typed input has no labels, so no loss effects. Ctrl+Enter runs."
          : "Which latents fire on each token, with activations and exact loss effects (ΔCE of the next token when the latent is removed), computed by the model now. Ctrl+Enter runs." }),
        text,
        h("div", { class: "controls spaced" }, [button, status]),
      ]),
      out,
    ]);
    // Back to this view: the last result comes back as it was, without re-running the model.
    if (liveState.result && liveState.prompt === text.value) renderLiveResult(out, liveState.result, known);
  }

  /* The live view's state survives leaving the page and coming Back: the last result and choices, per tab. */
  const liveState = (() => {
    try { return Object.assign({ mode: "act", sort: "loss", desc: true }, JSON.parse(sessionStorage.getItem("saelab-live") || "{}")); }
    catch (e) { return { mode: "act", sort: "loss", desc: true }; }
  })();
  function saveLive() {
    try { sessionStorage.setItem("saelab-live", JSON.stringify(liveState)); } catch (e) { /* storage full: keep going */ }
  }

  function renderLiveResult(out, result, known) {
    const perLatent = new Map();
    result.firing.forEach((list, pos) => list.forEach((f) => {
      const e = perLatent.get(f[0]) || { id: f[0], max: 0, loss: 0, n: 0, acts: new Map(), losses: new Map() };
      e.max = Math.max(e.max, f[1]);
      e.loss += f[2] == null ? 0 : f[2];
      e.n += 1;
      e.acts.set(pos, f[1]);
      if (f[2] != null) e.losses.set(pos, f[2]);
      perLatent.set(f[0], e);
    }));
    const live = liveState;
    const task = !!result.answers; // a typed task input: no labels, so no loss effects to show or sort by
    const latents = Array.from(perLatent.values());
    let selected = perLatent.has(live.selected) ? live.selected : latents.length ? latents.slice().sort((a, b) => b.max - a.max)[0].id : null;
    let selectedToken = live.token != null && live.token < result.tokens.length ? live.token : null;
    const tokensBox = h("div", { class: "window", dir: "ltr" });
    const detail = h("div");
    const tableBox = h("div", { class: "scroll" });
    const remember = () => { live.selected = selected; live.token = selectedToken; saveLive(); };
    const draw = () => {
      remember();
      tokensBox.replaceChildren();
      const e = perLatent.get(selected);
      const lossMax = e ? Math.max(0, ...Array.from(e.losses.values(), Math.abs)) : 0;
      result.tokens.forEach((t, pos) => {
        const a = e ? e.acts.get(pos) || 0 : 0;
        const loss = e ? e.losses.get(pos) : null;
        const rows = [["position", String(pos)], ["latents firing", String(result.firing[pos].length)]];
        if (e) rows.push(["latent " + selected, num(a, 4)]);
        if (loss != null) rows.push(["its ΔCE here (exact)", signed(loss, 4)]);
        if (result.ce[pos] != null) rows.push(["next-token CE", num(result.ce[pos], 4)]);
        if (result.answers) rows.push(["model's answer", result.answers[pos]]);
        const background = live.mode === "loss" && !task ? lossColor(loss, lossMax) : actColor(a, e ? e.max : 0);
        const span = tokenSpan(t, { rows: rows, background: background, onclick: () => { selectedToken = pos; draw(); } });
        if (pos === selectedToken) span.classList.add("sel");
        tokensBox.append(span);
      });
      detail.replaceChildren(selectedToken == null ? h("p", { class: "muted", text: "Click a token to list the latents firing on it." }) : tokenTable(result, selectedToken, known, (id) => { selected = id; draw(); }));
      drawTable();
    };
    const LIVE_COLUMNS = [
      ["id", "Latent", "", "latent id; click the row to colour the tokens by it"],
      ["max", "Max act", "num", "its largest activation on this prompt"],
      ["loss", "Σ ΔCE", "num", "its exact same-position ΔCE summed over the tokens where it fires: how much the loss rises when it is removed at each (positive: it helps)"],
      ["n", "Tokens", "num", "tokens where it fires"],
    ];
    if (task) LIVE_COLUMNS.splice(2, 1);
    const drawTable = () => {
      const key = LIVE_COLUMNS.some((c) => c[0] === live.sort) ? live.sort : "max";
      const rows = latents.slice().sort((a, b) => (key === "id" ? a.id - b.id : b[key] - a[key]) * (live.desc ? 1 : -1) || a.id - b.id);
      const sortBy = (c) => {
        live.desc = live.sort === c[0] ? !live.desc : true;
        live.sort = c[0];
        draw();
        const again = tableBox.querySelector("th[data-key='" + c[0] + "']");
        if (again) again.focus(); // the keyboard stays on the header it sorted by
      };
      const head = h("tr", {}, LIVE_COLUMNS.map((c) => h("th", {
        class: (c[2] + (c[0] === key ? " sorted" : "")).trim() || null,
        text: c[1] + (c[0] === key ? (live.desc ? " ▼" : " ▲") : ""),
        title: c[3],
        tabindex: "0",
        "data-key": c[0],
        "aria-sort": c[0] === key ? (live.desc ? "descending" : "ascending") : null,
        onclick: () => sortBy(c),
        onkeydown: (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); sortBy(c); } },
      })));
      tableBox.replaceChildren(h("table", { class: "latents live-latents" }, [
        h("thead", {}, head),
        h("tbody", {}, rows.slice(0, 200).map((e) => h("tr", { class: e.id === selected ? "selected" : null, onclick: () => { selected = e.id; draw(); } }, [
          h("td", {}, known.has(e.id) ? link(e.id) : noPage(e.id)),
          h("td", { class: "num", text: num(e.max) }),
          task ? null : h("td", { class: "num", text: signed(e.loss) }),
          h("td", { class: "num", text: String(e.n) }),
        ]))),
      ]));
    };
    const modeBox = h("select", { "aria-label": "colour tokens by" }, [
      h("option", { value: "act", text: "colour: the selected latent's activation" }),
      h("option", { value: "loss", text: "colour: its ΔCE (blue helps, red hurts)" }),
    ]);
    modeBox.value = live.mode;
    modeBox.addEventListener("change", () => { live.mode = modeBox.value; draw(); });
    draw();
    out.replaceChildren(
      h("section", { class: "panel" }, [h("h2", { text: "Tokens (coloured by the selected latent)" }), task ? null : h("div", { class: "controls" }, [modeBox]), tokensBox]),
      h("div", { class: "grid two" }, [
        h("section", { class: "panel" }, [h("h2", { text: "Latents on this prompt" }), tableBox]),
        h("section", { class: "panel" }, [h("h2", { text: "On the selected token" }), detail]),
      ]),
    );
  }

  function tokenTable(result, pos, known, onSelect) {
    const list = result.firing[pos].slice().sort((a, b) => b[1] - a[1]);
    const task = !!result.answers; // a typed task input has no loss effects: activations only
    const heads = ["Activation"].concat(task ? [] : ["ΔCE exact", "ΔCE direct"]);
    return h("div", {}, [
      h("div", { class: "small muted" }, ["token ", chip(result.tokens[pos]), " at position " + pos, task ? " · model's answer " : null, task ? chip(result.answers[pos]) : null]),
      h("table", { class: "latents live-latents" }, [
        h("thead", {}, h("tr", {}, [h("th", { text: "Latent" })].concat(heads.map((t) => h("th", { class: "num", text: t }))))),
        h("tbody", {}, list.map((f) => h("tr", { onclick: () => onSelect(f[0]) }, [
          h("td", {}, known.has(f[0]) ? link(f[0]) : noPage(f[0])),
          h("td", { class: "num", text: num(f[1], 4) }),
          task ? null : h("td", { class: "num", text: signed(f[2], 4) }),
          task ? null : h("td", { class: "num", text: signed(f[3], 4) }),
        ]))),
      ]),
    ]);
  }

  // ------------------------------------------------------------------------------------------------ router

  function route() {
    const hash = location.hash || "#/";
    const m = /^#\/latent\/(\d+)$/.exec(hash);
    if (m) showLatent(Number(m[1]));
    else if (hash === "#/live") showLive();
    else showIndex();
  }

  window.addEventListener("hashchange", route);
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", route);
  else route();
})();
