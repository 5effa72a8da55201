"use strict";
// Shared helpers. All text reaches the page through textContent / setAttribute, never through HTML.
const DATA = JSON.parse(document.getElementById("data").textContent);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

// Characters that would vanish or break the layout, shown as visible marks inside running text.
const MARKS = { "\n": "↵", "\r": "␍", "\t": "⇥", "\f": "␌", "\v": "␋", "\u00a0": "⍽" };
function visible(text) {
  let out = "", replaced = false;
  for (const ch of text) {
    const code = ch.codePointAt(0);
    if (MARKS[ch]) { out += MARKS[ch]; replaced = true; }
    else if (code < 0x20 || code === 0x7f || (code >= 0x80 && code < 0xa0)) {
      out += "\\x" + code.toString(16).padStart(2, "0"); replaced = true;
    } else if (ch === "\u200b" || ch === "\ufeff") { out += "⟨zw⟩"; replaced = true; }
    else out += ch;
  }
  if (out === "") { out = "∅"; replaced = true; }
  return { text: out, replaced };
}
// For token chips (lists of single tokens): spaces also become visible.
function chipText(text) { return visible(text).text.replace(/ /g, "␣"); }
function quoted(text) { return JSON.stringify(text); }

function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1e5 || a < 1e-3) return x.toExponential(2);
  return Number(x.toPrecision(digits)).toString();
}
function pct(x) {
  if (!x) return "0";
  if (x < 1e-4) return x.toExponential(1).replace("e", "e");
  return (100 * x).toPrecision(2) + "%";
}
