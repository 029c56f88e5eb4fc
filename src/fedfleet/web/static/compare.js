// Runs side by side: the runs named in ?runs=a,b,c overlaid on one accuracy and one loss chart, each
// line labelled by the options that differ between the runs compared.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#2563eb", "#e08a0b", "#15803d", "#b91c1c", "#7c3aed", "#0891b2", "#be185d", "#4d7c0f"];
const DASHES = [[], [6, 4], [2, 3]];

// The names in ?runs=: split on the raw commas before decoding, so that a name with a comma (sent as %2C)
// stays whole. A name given twice is compared once.
function namesFromQuery() {
  const raw = window.location.search.slice(1).split("&").find((p) => p.startsWith("runs="));
  if (!raw) return [];
  const names = raw.slice(5).split(",").filter((s) => s !== "").map((s) => {
    try { return decodeURIComponent(s.replace(/\+/g, " ")); } catch (_) { return s; }
  });
  return [...new Set(names)];
}

// The option names whose values are not the same in every run: what tells the runs apart.
function differing(runs) {
  const keys = [...new Set(runs.flatMap((r) => Object.keys(r.options)))];
  return keys.filter((k) => new Set(runs.map((r) => JSON.stringify(r.options[k] ?? null))).size > 1);
}

function label(run, keys) {
  if (!keys.length) return run.name;
  return keys.map((k) => `${k}=${run.options[k] == null ? "—" : run.options[k]}`).join(", ");
}

function runHref(name) { return "runs/" + name.split("/").map(encodeURIComponent).join("/") + "/"; }

// One row per round that any run has; each run's value sits at its index, absent where it has none.
function mergeRounds(perRun, field) {
  const byRound = new Map();
  perRun.forEach((rounds, i) => {
    for (const r of rounds) {
      if (!byRound.has(r.round)) byRound.set(r.round, { round: r.round, values: [] });
      byRound.get(r.round).values[i] = r[field];
    }
  });
  return [...byRound.values()].sort((a, b) => a.round - b.round);
}

function series(runs, keys) {
  return runs.map((run, i) => ({
    key: `run${i}`, label: label(run, keys), color: COLORS[i % COLORS.length],
    dash: DASHES[Math.floor(i / COLORS.length) % DASHES.length], value: (row) => row.values[i] ?? null,
  }));
}

function legendRow(run, s) {
  const line = el("span", { class: "swatch-line" });
  line.style.borderTopColor = s.color;
  if (s.dash.length) line.style.borderTopStyle = "dashed";
  const best = run.best == null ? "—" : `${fmt.pct(run.best)} (${run.best_round})`;
  const name = run.dashboard ? el("a", { href: runHref(run.name), text: run.name }) : el("span", { text: run.name });
  return el("tr", {},
    el("td", { class: "swatch" }, line),
    el("td", { class: "label", text: s.label }),
    el("td", { class: "mono" }, name),
    el("td", {}, el("span", { class: "badge " + run.state, text: run.state })),
    el("td", { class: "num", text: `${run.rounds} / ${run.rounds_planned ?? "—"}` }),
    el("td", { class: "num", text: fmt.pct(run.final) }),
    el("td", { class: "num", text: best }));
}

function draw(runs, perRun) {
  const keys = differing(runs);
  const lines = series(runs, keys);
  $("legend").tBodies[0].replaceChildren(...runs.map((run, i) => legendRow(run, lines[i])));
  $("legend-panel").hidden = false;
  $("charts").hidden = false;
  const federated = runs.some((r) => r.scored_by === "federated");
  const on = federated ? "(held-out test set; workers' validation where no test set)" : "(held-out test set)";
  $("accuracy-caption").textContent = `Accuracy by round ${on}`;
  $("loss-caption").textContent = `Loss by round ${on}`;
  const planned = Math.max(...runs.map((r) => r.rounds_planned || r.rounds || 1));
  new LineChart($("chart-accuracy"), { percent: true, series: lines, emptyText: "no rounds" })
    .setData(mergeRounds(perRun, "score"), planned);
  new LineChart($("chart-loss"), { series: lines, emptyText: "no rounds" }).setData(mergeRounds(perRun, "loss"), planned);
  $("lede").textContent = keys.length
    ? `${runs.length} runs; each line is labelled by the options that differ between them.`
    : runs.length === 1 ? "One run." : `${runs.length} runs with the same options; each line is labelled by its folder.`;
}

async function load() {
  const names = namesFromQuery();
  if (!names.length) {
    $("lede").replaceChildren("No runs picked: tick them on ", el("a", { href: "./", text: "the run list" }), ".");
    return;
  }
  try {
    // Names are checked against the list first, so that an unknown one is named here, not fetched.
    const list = await getJSON("v1/runs");
    const known = new Set(list.runs.map((r) => r.name));
    const unknown = names.filter((n) => !known.has(n));
    if (unknown.length) {
      $("error").textContent = `No run named ${unknown.map((n) => JSON.stringify(n)).join(", ")} in this folder; ` +
        "the others are shown.";
    }
    const chosen = names.filter((n) => known.has(n));
    if (!chosen.length) { $("lede").textContent = "None of the runs named can be shown."; return; }
    const answers = await Promise.all(chosen.map((n) => getJSON("v1/runs/" + encodeURIComponent(n))));
    $("title").textContent = `Compare ${chosen.length} ${chosen.length === 1 ? "run" : "runs"}`;
    draw(answers.map((a) => a.run), answers.map((a) => a.rounds));
  } catch (err) {
    $("error").textContent = `The runs could not be read: ${err.message}`;
  }
}

if (typeof showSession === "function") showSession($("session"));
load();
