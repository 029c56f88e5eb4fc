// Helpers shared by the dashboard and the predict page. Plain browser JavaScript: no build step, no CDN.
"use strict";

const fmt = {
  pct(x) { return x == null ? "—" : (100 * x).toFixed(1) + "%"; },
  num(x, digits = 3) { return x == null ? "—" : Number(x).toFixed(digits); },
  seconds(s) {
    if (s == null) return "—";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 100) return s.toFixed(1) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
    return (s / 3600).toFixed(1) + " h";
  },
  ago(s) { return s == null ? "—" : (s < 1 ? "just now" : fmt.seconds(s) + " ago"); },
  // Three significant digits, as printf's %g: 2.31, 8, 0.5, and 1e-5 rather than 0.00001.
  g(x) {
    if (x == null) return "—";
    const a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(2).replace(/\.?0+e/, "e").replace("e+", "e");
    return String(Number(x.toPrecision(3)));
  },
};

// Build an element: el("td", {class: "num", text: "3"}, child, ...).
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// fetch JSON; a non-2xx answer throws an Error carrying the server's `detail`, the status and the body.
async function getJSON(url, options = {}) {
  const res = await fetch(url, options);
  let body = null;
  try { body = await res.json(); } catch (_) { /* an empty or non-JSON body: report the status alone */ }
  if (!res.ok) {
    const err = new Error((body && body.detail) || `${res.status} ${res.statusText}`);
    err.status = res.status;
    err.body = body;
    throw err;
  }
  return body;
}
