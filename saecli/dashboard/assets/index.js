// The feature table: sortable by index, density, max activation and autointerp scores; searchable by
// explanation or token, or filtered by score ("detection>0.8", "fuzzing<0.5").
(function () {
  const app = document.getElementById("app");
  app.textContent = "";
  // rows: [index, act_times, density, max_act, tokens[], explanation, has_page, score per DATA.scorers...,
  //        (two-model crosscoder) relative decoder norm, model label]
  const rows = DATA.features;
  const PAGE = 500;
  let sortKey = 2, asc = false, query = "", shown = PAGE;

  app.append(el("header", { class: "top" }, el("h1", { text: DATA.title }),
    el("span", { class: "sub", text: DATA.subtitle })));
  if (DATA.density_svg) {
    const box = el("div", { class: "card" }, el("h2", { text: "Feature density (log10 of the firing fraction)" }));
    const holder = el("div"); holder.innerHTML = DATA.density_svg;  // built by saecli: numbers only
    box.append(holder); app.append(box);
  }
  const diff = DATA.model_diff;  // two-model crosscoder: rows end with [ratio, label]
  if (diff) {
    const [a, b] = diff.models, t = diff.exclusive_ratio;
    const box = el("div", { class: "card" }, el("h2", { text: "Which model each feature belongs to" }),
      el("p", { class: "sub", text: "relative decoder norm r = ‖d_" + b + "‖ / (‖d_" + a + "‖ + ‖d_" + b + "‖): " +
        a + "-only when r ≤ " + t + ", " + b + "-only when r ≥ " + (1 - t) + ", shared between" }));
    const holder = el("div"); holder.innerHTML = diff.svg;  // built by saecli: numbers only
    box.append(holder); app.append(box);
  }
  const search = el("input", { type: "search", placeholder: "search explanations or tokens, or #index",
                               "aria-label": "search" });
  const count = el("span", { class: "n" });
  app.append(el("div", { class: "toolbar" }, search, count));

  const scorers = DATA.scorers || [];
  const cols = [["#", 0], ["density", 2], ["max act", 3], [DATA.tokens_label || "tokens", null], ["explanation", null],
                ...scorers.map((s, j) => [s + " F1", 7 + j]), ...(diff ? [["model (r)", diff.col]] : [])];
  const head = el("tr", {});
  const ths = cols.map(([name, key]) => {
    const th = el("th", { class: key === null ? null : "sortable", text: name });
    if (key !== null) th.addEventListener("click", () => {
      if (sortKey === key) asc = !asc; else { sortKey = key; asc = key === 0; }
      shown = PAGE; draw();
    });
    head.append(th);
    return [th, key];
  });
  const body = el("tbody");
  app.append(el("div", { class: "card" }, el("table", { class: "features" }, el("thead", {}, head), body)));
  const more = el("button", { class: "more", text: "show more" });
  more.addEventListener("click", () => { shown += PAGE; draw(); });
  app.append(more);

  const maxLogD = Math.log10(Math.max(...rows.map(r => r[2]), 1e-12));
  const minLogD = -7;
  const value = (r, key) => (r[key] === null || r[key] === undefined ? -1 : r[key]);  // unscored last
  function matches(r) {
    if (!query) return true;
    const cmp = query.match(/^(\w+)\s*([<>]=?)\s*([\d.]+)$/);
    if (cmp && scorers.includes(cmp[1])) {
      const v = r[7 + scorers.indexOf(cmp[1])], x = parseFloat(cmp[3]);
      if (v === null || v === undefined) return false;
      return cmp[2] === ">" ? v > x : cmp[2] === ">=" ? v >= x : cmp[2] === "<" ? v < x : v <= x;
    }
    if (query.startsWith("#")) return String(r[0]) === query.slice(1);
    if (/^\d+$/.test(query) && String(r[0]) === query) return true;
    if (diff && r[diff.col + 1].toLowerCase() === query) return true;  // "shared", "chat-only"...
    return (r[5] || "").toLowerCase().includes(query) || r[4].some(t => t.toLowerCase().includes(query));
  }
  function draw() {
    for (const [th, key] of ths) {
      th.classList.toggle("sorted", key === sortKey);
      th.classList.toggle("asc", key === sortKey && asc);
    }
    const list = rows.filter(matches).sort((a, b) => (asc ? value(a, sortKey) - value(b, sortKey) : value(b, sortKey) - value(a, sortKey)) || a[0] - b[0]);
    count.textContent = list.length.toLocaleString() + " of " + rows.length.toLocaleString() + " features";
    body.textContent = "";
    for (const r of list.slice(0, shown)) {
      const [i, , d, m, toks, expl, page] = r;
      const w = d > 0 ? Math.max(2, 60 * (Math.log10(d) - minLogD) / (maxLogD - minLogD)) : 0;
      body.append(el("tr", { class: page ? null : "dead" },
        el("td", { class: "num" }, page ? el("a", { href: "features/" + i + ".html", text: "#" + i }) : "#" + i),
        el("td", { class: "num", title: r[1].toLocaleString() + " tokens" },
          el("span", { class: "dbar", style: "width:" + w.toFixed(1) + "px" }), pct(d)),
        el("td", { class: "num", text: fmt(m, 3) }),
        el("td", {}, toks.map(t => el("span", { class: "chip", title: quoted(t), text: chipText(t) }))),
        el("td", { text: expl || "" }),
        scorers.map((s, j) => el("td", { class: "num", text: r[7 + j] === null ? "–" : fmt(r[7 + j], 3) })),
        diff ? el("td", { class: "model", text: r[diff.col + 1] + " (" + fmt(r[diff.col], 2) + ")" }) : null));
    }
    more.style.display = list.length > shown ? "" : "none";
  }
  search.addEventListener("input", () => {
    query = search.value.trim().toLowerCase(); shown = PAGE;
    history.replaceState(null, "", query ? "#q=" + encodeURIComponent(search.value.trim()) : "#");
    draw();
  });
  if (location.hash.startsWith("#q=")) {  // a shareable search: index.html#q=bracket
    search.value = decodeURIComponent(location.hash.slice(3));
    query = search.value.trim().toLowerCase();
  }
  draw();
})();
