// One feature: stats, activation histogram, DLA tokens, explanation, extras and its contexts.
(function () {
  const f = DATA;
  const app = document.getElementById("app");
  app.textContent = "";
  const vocab = f.vocab;

  const nav = el("nav", {},
    el("a", { href: "../index.html", text: "← all features" }),
    f.prev !== null ? el("a", { href: f.prev + ".html", text: "‹ #" + f.prev }) : null,
    f.next !== null ? el("a", { href: f.next + ".html", text: "#" + f.next + " ›" }) : null);
  app.append(el("header", { class: "top" },
    el("h1", { text: "Feature #" + f.index }), el("span", { class: "sub", text: f.title }), nav));

  // left: numbers and histogram; right: explanation and DLA
  const stats = el("dl", { class: "stats" });
  const stat = (k, v) => stats.append(el("dt", { text: k }), el("dd", { text: v }));
  stat("density", pct(f.density));
  stat("fired on", f.act_times.toLocaleString() + " of " + f.n_tokens.toLocaleString() + " tokens");
  stat("max activation", fmt(f.max_act, 4));
  if (f.model) stat("model", f.model.label + " (‖d_" + f.model.models[1] + "‖ / Σ‖d‖ = " + fmt(f.model.ratio, 3) + ")");
  for (const [k, v] of Object.entries(f.scalars || {})) stat(k.replace(/_/g, " "), fmt(v, 4));
  const hist = el("div", { class: "card" }, el("h2", { text: "Activation histogram" }));
  if (f.hist_svg) { const box = el("div"); box.innerHTML = f.hist_svg; hist.append(box); }  // built by saecli: numbers only
  else hist.append(el("p", { class: "empty", text: "never fired" }));
  const left = el("div", {}, el("div", { class: "card" }, el("h2", { text: "Statistics" }), stats), hist);

  const right = el("div", {});
  const expl = el("div", { class: "card" }, el("h2", { text: "Explanation" }),
    f.explanation ? el("p", { class: "explanation", text: f.explanation })
                  : el("p", { class: "explanation none", text: "no explanation yet" }),
    Object.keys(f.scores || {}).length
      ? el("p", { class: "scores", text: Object.entries(f.scores).map(([k, v]) => k + " F1 " + fmt(v, 3)).join(" · ") })
      : null);
  right.append(expl);
  if (f.dla) {
    const side = (title, items, cls) => {
      const peak = Math.max(1e-12, ...items.map(([, v]) => Math.abs(v)));
      return el("div", { class: cls }, el("h3", { text: title }),
        items.map(([t, v]) => el("div", { class: "row", title: quoted(t) + " · logit " + fmt(v, 4) },
          el("span", {}, el("span", { class: "chip", text: chipText(t) })),
          el("div", {}, el("div", { class: "bar", style: "width:" + (100 * Math.abs(v) / peak).toFixed(1) + "%" })),
          el("span", { class: "v", text: (v > 0 ? "+" : "") + fmt(v, 3) }))));
    };
    right.append(el("div", { class: "card" }, el("h2", { text: "Direct logit attribution" }),
      el("div", { class: "dla" }, side("promotes", f.dla.pos, "pos"), side("suppresses", f.dla.neg, "neg"))));
  }
  for (const ex of f.vectors || []) {
    const peak = Math.max(1e-12, ...ex.values.map(Math.abs));
    right.append(el("div", { class: "card extras" }, el("h2", { text: ex.name.replace(/_/g, " ") }),
      ex.values.map((v, i) => el("div", { class: "row" },
        el("span", { class: "chip", text: ex.labels ? ex.labels[i] : String(i) }),
        el("div", {}, el("div", { class: "bar", style: "width:" + (100 * Math.abs(v) / peak).toFixed(1) + "%" })),
        el("span", { class: "v", text: fmt(v, 3) })))));
  }
  app.append(el("div", { class: "grid" }, left, right));

  // contexts
  const maxAct = f.max_act > 0 ? f.max_act : 1;
  function renderContext(c, full, scale) {
    const n = c.t.length, acts = new Float64Array(n);
    for (const [i, v] of c.a) acts[i] = v;
    let lo = 0, hi = n;
    if (!full) {  // a window around the peak, slid to stay full near either end of the context
      const span = f.window[0] + f.window[1] + 1;
      lo = c.p >= 0 ? Math.max(0, Math.min(c.p - f.window[0], n - span)) : 0;
      hi = Math.min(n, lo + span);
    }
    const line = el("p", { class: "ctx", title: null });
    line.append(el("span", { class: "meta",
      text: (c.m > 0 ? "max " + fmt(c.m, 3) + " · " : "") + "doc " + c.d + " @ " + c.s }));
    if (lo > 0 || c.cut_before) line.append(el("span", { class: "more", text: "… " }));
    for (let i = lo; i < hi; i++) {
      const raw = vocab[c.t[i]], shown = visible(raw), a = acts[i];
      const cls = ["tok"];
      if (a > 0) cls.push("act");
      if (i === c.p) cls.push("peak");
      if (shown.replaced) cls.push("ws");
      const alpha = a > 0 ? Math.min(1, a / scale) * 0.9 : 0;
      line.append(el("span", {
        class: cls.join(" "), "data-act": a > 0 ? fmt(a, 4) : null,
        style: a > 0 ? "background-color: rgba(255,122,0," + alpha.toFixed(3) + ")" : null,
        title: quoted(raw) + (a > 0 ? " · act " + fmt(a, 4) + " (" + (a / scale).toFixed(2) + "× max)" : ""),
        text: shown.text }));
    }
    if (hi < n || c.cut_after) line.append(el("span", { class: "more", text: " …" }));
    line.addEventListener("click", () => line.replaceWith(renderContext(c, !full, scale)));
    return line;
  }
  for (const s of f.samplings) {
    const card = el("div", { class: "card sampling", "data-sampling": s.name },
      el("h2", {}, s.label + " ", el("span", { class: "count", text: "(" + s.contexts.length + ")" }),
        el("span", { class: "hint", text: s.hint })));
    if (!s.contexts.length) card.append(el("p", { class: "empty", text: "none" }));
    for (const c of s.contexts) card.append(renderContext(c, false, s.scale > 0 ? s.scale : maxAct));
    app.append(card);
  }
  app.append(el("footer", { text: "saecli · click a context to show all of it; hover a token for its value" }));
})();
