// The run list of `fedfleet serve DIR`: every run folder under DIR (scanned again on each load), with
// check boxes to pick runs for the compare view. Names come from the folder: shown as text, never markup.
"use strict";

const $ = (id) => document.getElementById(id);
const picked = new Set();

// "lr=0.2 · partition=dirichlet:0.3": the options that set a run apart from the others listed.
function optionText(options, keys) {
  return keys.map((k) => `${k}=${options[k] == null ? "—" : options[k]}`).join(" · ");
}

// A run's page: its name's parts encoded one by one, so that "sweep/a b" stays two folders.
function runHref(name) { return "runs/" + name.split("/").map(encodeURIComponent).join("/") + "/"; }

function when(unix) {
  if (unix == null) return "—";
  const d = new Date(unix * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function stateNote(run) {
  if (run.state === "running") return "still running: its coordinator serves it live";
  if (run.state === "incomplete") return "no summary.json: it ended without one (killed?); fedfleet run --resume carries it on";
  return run.message || "";
}

function row(run, differing) {
  const box = el("input", { type: "checkbox", "aria-label": `pick ${run.name}`, dataset: { name: run.name } });
  box.checked = picked.has(run.name);
  box.disabled = run.error != null || run.rounds === 0;
  box.addEventListener("change", () => { box.checked ? picked.add(run.name) : picked.delete(run.name); showPicked(); });
  const name = run.dashboard ? el("a", { href: runHref(run.name), text: run.name }) : el("span", { text: run.name });
  const nameCell = el("td", { class: "run-name" }, name);
  if (run.error != null) {
    return el("tr", { class: "damaged" }, el("td", {}, box), nameCell,
      el("td", {}, el("span", { class: "badge failed", text: "damaged" })),
      el("td", { colspan: "7", class: "run-error", text: run.error }));
  }
  const note = stateNote(run);
  const best = run.best == null ? "—" : `${fmt.pct(run.best)} (${run.best_round})`;
  const scored = run.scored_by === "federated" ? " (workers' validation)" : "";
  return el("tr", {},
    el("td", {}, box), nameCell,
    el("td", {}, el("span", { class: "badge " + run.state, text: run.state, title: note })),
    el("td", { class: "num", text: fmt.pct(run.final) + scored }),
    el("td", { class: "num", text: best }),
    el("td", { class: "num", text: `${run.rounds} / ${run.rounds_planned ?? "—"}` }),
    el("td", { class: "differs", text: optionText(run.options, differing) || "—" }),
    el("td", { class: "mono", text: run.task || "—" }),
    el("td", { class: "when", text: when(run.ended) }),
    el("td", { class: "mono", text: run.run_id || "—" }));
}

function showPicked() {
  const n = picked.size;
  $("picked").textContent = n === 0 ? "tick runs to compare them" : `${n} picked`;
  $("compare-button").disabled = n < 1;
}

// The compare view's URL: each name encoded, so that a comma in a folder's name cannot split it.
function compareHref() {
  return "compare?runs=" + [...picked].map(encodeURIComponent).join(",");
}

function showSkipped(skipped, truncated) {
  const box = $("skipped");
  box.hidden = skipped.length === 0 && !truncated;
  if (box.hidden) return;
  const parts = [];
  if (skipped.length) {
    const list = el("ul", {}, ...skipped.map((s) => el("li", {}, el("span", { class: "mono", text: s.name }), ": " + s.why)));
    const word = skipped.length === 1 ? "folder" : "folders";
    parts.push(el("details", {}, el("summary", { text: `${skipped.length} ${word} skipped: not runs` }), list));
  }
  if (truncated) parts.push(el("p", { text: "More runs than the list shows: only the first 1000 by name are listed." }));
  box.replaceChildren(...parts);
}

function render(body) {
  $("root").textContent = body.root;
  const n = body.runs.length;
  $("lede").textContent = n === 0
    ? "No run folders here yet (a run folder has a config.toml). Runs made here show up when you reload this page."
    : `${n} ${n === 1 ? "run" : "runs"}; the list is read again each time this page loads. Scores are test accuracy ` +
      "(R² for regression) unless marked as the workers' validation.";
  showSkipped(body.skipped, body.truncated);
  for (const name of [...picked]) if (!body.runs.some((r) => r.name === name)) picked.delete(name);
  const tbody = $("runs").tBodies[0];
  tbody.replaceChildren(...(n ? body.runs.map((r) => row(r, body.differing))
    : [el("tr", {}, el("td", { colspan: "10", class: "empty", text: "no runs" }))]));
  showPicked();
}

async function load() {
  try {
    render(await getJSON("v1/runs"));
  } catch (err) {
    $("error").textContent = `The list of runs could not be read: ${err.message}`;
  }
}

$("compare-button").addEventListener("click", () => { window.location.href = compareHref(); });
if (typeof showSession === "function") showSession($("session"));
load();
