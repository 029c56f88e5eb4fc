// The live dashboard: state arrives as server-sent events (v1/events) whenever the run changes; each
// worker's own history (v1/dashboard/workers) is fetched only when the number of rounds (or the page of
// workers) changes, not on every event.
"use strict";

const $ = (id) => document.getElementById(id);
// What the workers reported sits in its own field of a round record, apart from the coordinator's
// own numbers: read it there, by the series' name, and never merge it into the record.
const workerMetric = (name) => (row) => (row.worker_metrics || {})[name];
const timing = (name) => (row) => (row.timings || {})[name];

// Bytes as a person reads them: 2.9 kB, 41.3 MB (powers of 1000, as network traffic is counted). An axis
// tick (step given) has the decimals that tell it from its neighbours in its own unit: 3.5 kB, 4.0 kB.
function bytes(n, _decimals = null, step = null) {
  if (n == null) return "—";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0, x = n;
  while (Math.abs(x) >= 1000 && i < units.length - 1) { x /= 1000; i++; }
  const decimals = step ? Math.min(3, decimalsFor(step / Math.pow(1000, i))) : i === 0 ? 0 : 1;
  return `${x.toFixed(decimals)} ${units[i]}`;
}
// An axis tick in seconds: as many decimals as the ticks' step needs.
const seconds = (v, decimals) => (decimals == null ? fmt.seconds(v) : `${v.toFixed(decimals)} s`);
const pct2 = (v) => (100 * v).toFixed(2) + "%";

const charts = {
  accuracy: new LineChart($("chart-accuracy"), {
    percent: true,
    series: [
      { key: "accuracy", label: "test (held-out)", color: "#2563eb" },
      // The model each worker was sent, on its own validation split: the run's only score when it has no
      // held-out set (each site's own data without --test-data).
      { key: "fed_accuracy", label: "validation (workers')", color: "#15803d", dash: [2, 3] },
      // With --server-val: the new model on the training examples the coordinator kept from every worker.
      { key: "val_accuracy", label: "validation (coordinator's)", color: "#7c3aed", dash: [8, 3], optional: true },
      { key: "train_accuracy", label: "train (workers')", color: "#e08a0b", dash: [6, 4],
        value: workerMetric("train_accuracy") },
    ],
    // How far apart the workers' own validation scores were: a skewed partition shows as a wide band.
    band: { lo: (row) => row.fed_accuracy_min, hi: (row) => row.fed_accuracy_max,
            color: "rgba(21, 128, 61, .14)", label: "spread (workers' min–max)" },
  }),
  loss: new LineChart($("chart-loss"), {
    series: [
      { key: "loss", label: "test (held-out)", color: "#2563eb" },
      { key: "fed_loss", label: "validation (workers')", color: "#15803d", dash: [2, 3] },
      { key: "val_loss", label: "validation (coordinator's)", color: "#7c3aed", dash: [8, 3], optional: true },
      { key: "train_loss", label: "train (workers')", color: "#e08a0b", dash: [6, 4],
        value: workerMetric("train_loss") },
    ],
  }),
  time: new LineChart($("chart-time"), {
    format: seconds,
    floor: 0,
    series: [
      { key: "seconds", label: "whole round", color: "#2563eb" },
      { key: "open", label: "training and transfers", color: "#e08a0b", dash: [6, 4], value: timing("open") },
      { key: "wait_workers", label: "waiting for workers", color: "#b91c1c", dash: [2, 3],
        value: timing("wait_workers") },
    ],
  }),
  bytes: new LineChart($("chart-bytes"), {
    format: bytes,
    floor: 0,
    series: [
      { key: "bytes_out", label: "out (models sent)", color: "#2563eb" },
      { key: "bytes_in", label: "in (updates received)", color: "#15803d", dash: [6, 4] },
    ],
  }),
  // Only shown for a run with --dp central. The budget line is set with the run's privacy settings.
  epsilon: new LineChart($("chart-epsilon"), {
    series: [{ key: "dp_epsilon", label: "ε spent", color: "#7c3aed" }],
  }),
};
const EPSILON_SERIES = charts.epsilon.series[0];
const heat = {
  score: new HeatMap($("heat-score"), { readout: $("heat-score-readout") }),
  loss: new HeatMap($("heat-loss"), { readout: $("heat-loss-readout") }),
};
// Class colours of the label mix (Tableau 10): distinct next to each other; more classes cycle.
const CLASS_COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
  "#9c755f", "#bab0ac"];

let runId = "run";
let rounds = [];
let status = null;
let workers = [];
let workersAt = 0; // when the worker table arrived: "last seen" counts on from it in the browser
// The state carries one page of the workers (by partition); the pager asks the stream for another.
let workersOffset = 0;
let workersPage = { offset: 0, limit: 100, total: 0 };

function render(state) {
  const s = state.status;
  status = s;
  runId = s.run_id;
  rounds = rounds.slice(0, state.rounds_from).concat(state.rounds);
  $("run-id").textContent = s.run_id;
  // A run that is blocked says so on its badge: "running" alone would look healthy.
  $("run-state").textContent = s.waiting ? "waiting for workers" : s.state;
  $("run-state").className = "badge " + (s.waiting ? "waiting" : s.state);
  $("message").textContent = s.message || "";
  $("message").className = "message " + s.state;
  $("round").textContent = s.round;
  $("rounds").textContent = s.rounds;
  $("round-bar").style.width = Math.min(100, 100 * s.round / Math.max(s.rounds, 1)) + "%";
  $("phase").textContent = s.phase;
  $("phase").title = s.phase; // wraps in its card; the tooltip also holds it whole
  const o = state.open_round;
  $("open-round").textContent = !o ? "" : o.kind === "stats"
    ? `statistics: ${o.answered}/${o.sampled} answered`
    : `round ${o.round}${o.attempt ? ` (attempt ${o.attempt + 1})` : ""}: ${o.answered} of ${o.sampled} answered`
      + (o.needed != null && o.answered < o.needed ? `, ${o.needed} needed` : "");
  // A round held up by workers that have gone quiet says so (of the page of workers shown).
  const silent = state.workers.filter((w) => w.status === "silent").length;
  if (o && silent) $("open-round").textContent += `; waiting on ${silent} silent (probably stopped)`;
  renderScore(s);
  $("loss").textContent = fmt.num(s.loss, 4);
  $("task").textContent = "task " + s.task;
  $("workers-count").textContent = state.live ? `${s.workers_live} / ${s.workers_registered}` : `— / ${s.workers_registered}`;
  renderCost(s);
  renderWaiting();
  for (const name of ["accuracy", "loss", "time", "bytes"]) charts[name].setData(rounds, s.rounds);
  renderPrivacy(state.dp, s.rounds);
  renderConfusion();
  workers = state.workers;
  workersAt = performance.now();
  if (state.workers_page) workersPage = state.workers_page;
  renderWorkers();
  renderPager();
  renderConfig(state.config);
  wantHistory();
}

function renderScore(s) {
  $("accuracy").textContent = fmt.pct(s.accuracy);
  const prev = rounds.length > 1 ? rounds[rounds.length - 2].accuracy : null;
  $("accuracy-change").textContent = prev == null || s.accuracy == null ? ""
    : `${s.accuracy >= prev ? "+" : "−"}${(100 * Math.abs(s.accuracy - prev)).toFixed(2)} points in the last round`;
  const last = rounds.length ? rounds[rounds.length - 1] : null;
  if (s.accuracy == null && last && last.accuracy == null && last.fed_accuracy != null) {
    // No held-out set (each site's own data without --test-data): the workers' validation is the score.
    $("accuracy").textContent = fmt.pct(last.fed_accuracy);
    $("accuracy-change").textContent = "workers' validation: no held-out set";
  }
}

// How long a round takes, the bytes moved and the time left. The estimate is the mean of the last (up to)
// ten rounds' seconds times the rounds left: recent rounds, since the first ones wait for workers to join.
const ETA_ROUNDS = 10;
function renderCost(s) {
  const last = rounds.length ? rounds[rounds.length - 1] : null;
  const recent = rounds.slice(-ETA_ROUNDS);
  const mean = recent.length ? recent.reduce((a, r) => a + r.seconds, 0) / recent.length : null;
  $("round-time").textContent = last ? fmt.seconds(last.seconds) : "—";
  $("round-time-detail").textContent = mean == null ? "" : `mean of last ${recent.length}: ${fmt.seconds(mean)}`;
  let total = 0, totalIn = 0;
  for (const r of rounds) { total += r.bytes_in + r.bytes_out; totalIn += r.bytes_in; }
  $("bytes-total").textContent = rounds.length ? bytes(total) : "—";
  $("bytes-total").dataset.bytes = String(total);
  $("bytes-detail").textContent = !last ? "" : `${bytes(totalIn)} in · ${bytes(total - totalIn)} out; `
    + `last round ${bytes(last.bytes_in)} in · ${bytes(last.bytes_out)} out`;
  $("bytes-detail").title = $("bytes-detail").textContent;
  const left = Math.max(0, s.rounds - s.round);
  const eta = $("eta");
  if (s.state === "finished" || left === 0) {
    eta.textContent = "none"; eta.dataset.seconds = "0";
    $("eta-detail").textContent = "all rounds done";
  } else if (!["running", "waiting"].includes(s.state)) {
    eta.textContent = "—"; delete eta.dataset.seconds;
    $("eta-detail").textContent = `run ${s.state}: ${left} rounds not run`;
  } else if (mean == null) {
    eta.textContent = "—"; delete eta.dataset.seconds;
    $("eta-detail").textContent = "known after the first round";
  } else {
    const secs = mean * left;
    eta.textContent = "≈ " + roughly(secs);
    eta.title = fmt.seconds(secs);
    eta.dataset.seconds = String(secs);
    const at = new Date(Date.now() + 1000 * secs);
    $("eta-detail").textContent = `${left} rounds × ${fmt.seconds(mean)}; done about `
      + at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
}

// A time left as precisely as an estimate deserves: 45 s, 19 min, 2 h 5 min.
function roughly(s) {
  if (s < 100) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

// A run blocked before a round (too few live workers): who is missing, how many are needed, and when the
// wait fails. Called each second too, for the countdown.
function renderWaiting() {
  const w = status && status.waiting;
  $("waiting").hidden = !w;
  if (!w) return;
  $("waiting-text").textContent = `${w.live} of the ${w.needed} live workers needed to start the next round `
    + `${w.live === 1 ? "is" : "are"} here. Missing:`;
  $("waiting-for").replaceChildren(...w.waiting_for.map((who) => el("li", { text: who })));
  const left = w.fails_at - Date.now() / 1000;
  const when = new Date(1000 * w.fails_at).toLocaleTimeString();
  $("waiting-countdown").textContent = left > 0
    ? `The run fails in ${clock(left)} (at ${when}) unless they come.`
    : `The wait ran out at ${when}: the run is failing.`;
}

// Seconds as a countdown: 4:07, or 1:02:09 past an hour.
function clock(s) {
  const t = Math.floor(s), h = Math.floor(t / 3600), m = Math.floor(t / 60) % 60, sec = String(t % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

// The privacy card and chart: only for a run with differential privacy (state.dp is null without it).
function renderPrivacy(dp, planned) {
  $("dp-card").hidden = !dp;
  $("dp-chart").hidden = !dp;
  if (!dp) return;
  // The budget ε is measured against: --dp-max-epsilon ends the run there; a target is what σ was solved for.
  const budget = dp.max_epsilon != null ? dp.max_epsilon : dp.target_epsilon;
  const kind = dp.max_epsilon != null ? "--dp-max-epsilon" : "--dp-target-epsilon";
  $("dp-epsilon").replaceChildren(`ε ${fmt.g(dp.epsilon)}`,
    ...(budget != null ? [el("span", { class: "of", text: ` of ${fmt.g(budget)}` })] : []));
  // "of" a maximum is where the run stops; "of" a target is what σ was solved for: say so only then.
  const what = budget != null && dp.max_epsilon == null ? "ε target" : null;
  $("dp-detail").textContent = [`δ ${fmt.g(dp.delta)}`, what,
    dp.noise_multiplier != null ? `σ ${fmt.g(dp.noise_multiplier)}` : null, `clip ${fmt.g(dp.clip)}`]
    .filter((x) => x != null).join(" · ");
  $("dp-card").title = `(ε, δ) = (${fmt.g(dp.epsilon)}, ${fmt.g(dp.delta)}) spent by ${dp.rounds} round(s) of the `
    + `Gaussian mechanism (central DP): clip ${fmt.g(dp.clip)}, sampling rate ${fmt.g(dp.sample_rate)}`
    + (dp.noise_multiplier != null ? `, noise multiplier σ ${fmt.g(dp.noise_multiplier)}` : "")
    + (budget != null ? `; budget ${fmt.g(budget)} (${kind})` : "");
  charts.epsilon.series = budget == null ? [EPSILON_SERIES] : [EPSILON_SERIES,
    { key: "budget", label: `budget (${kind})`, color: "#b91c1c", dash: [6, 4], dots: false,
      value: () => budget }];
  charts.epsilon.setData(rounds, planned);
}

// The last round's confusion matrix on the held-out set: counts, each row coloured by its share of the
// true class, and each class's recall. Hidden for a task that does not classify or a run without a test set.
function renderConfusion() {
  const last = rounds.length ? rounds[rounds.length - 1] : null;
  const cm = last && last.confusion;
  $("confusion-panel").hidden = !cm;
  if (!cm) return;
  $("confusion-round").textContent = `round ${last.round}, held-out set: rows true class, columns predicted`;
  const head = el("tr", {}, el("th", { text: "true \\ predicted" }),
    ...cm.classes.map((c) => el("th", { class: "num", text: c })), el("th", { class: "num", text: "recall" }));
  const body = cm.counts.map((row, i) => {
    const n = row.reduce((a, b) => a + b, 0);
    return el("tr", { dataset: { cls: String(i) } }, el("th", { scope: "row", text: cm.classes[i] }),
      ...row.map((k, j) => {
        const share = n ? k / n : 0;
        // Strong cells get white text on the dark blue; the share is in the tooltip.
        return el("td", { class: "num" + (share > 0.55 ? " strong" : "") + (i === j ? " diag" : ""), text: String(k),
          title: `${cm.classes[i]} predicted as ${cm.classes[j]}: ${k} of ${n} (${(100 * share).toFixed(1)}%)`,
          style: `background: rgba(37, 99, 235, ${(0.85 * share).toFixed(3)})` });
      }),
      el("td", { class: "num recall", text: n ? fmt.pct(row[i] / n) : "—" }));
  });
  $("confusion").replaceChildren(el("thead", {}, head), el("tbody", {}, ...body));
}

// --- each worker's own history -------------------------------------------------------------------------
// One fetch at a time, at most one a second (a run of 0.1 s rounds would otherwise fetch ten a second), and
// further apart when a fetch is slow (a long run's history is large): the page spends at most a fifth of its
// time on it. A change meanwhile is fetched by the next call, from an event or the page's once-a-second tick.
const HISTORY_EVERY_MS = 1000;
let historyWanted = null, historyHave = null, historyBusy = false, historyAt = -Infinity, historyTook = 0;
let workerHistory = null; // the last history drawn (window.history is the browser's)

function wantHistory() {
  if (!rounds.length) return; // no update yet: nothing to draw
  historyWanted = `${rounds.length}:${workersOffset}:${workersPage.limit}`;
  const every = Math.max(HISTORY_EVERY_MS, 5 * historyTook);
  if (!historyBusy && historyWanted !== historyHave && performance.now() - historyAt >= every) fetchHistory();
}

async function fetchHistory() {
  historyBusy = true;
  historyAt = performance.now();
  const key = historyWanted;
  try {
    // Only the rounds after those held, when the page holds this page of workers: a long run's history
    // is large, and what is held does not change (completed rounds are final).
    const page = `offset=${workersOffset}&limit=${workersPage.limit}`;
    const held = workerHistory && workerHistory.page === page && workerHistory.rounds.length <= rounds.length
      ? workerHistory : null;
    const from = held ? held.rounds.length : 0;
    const got = await getJSON(`v1/dashboard/workers?${page}&rounds_from=${from}`);
    renderHistory({ ...(appendRounds(held, got) || await getJSON(`v1/dashboard/workers?${page}`)), page });
    historyHave = key;
  } catch (err) {
    historyHave = key; // not asked again until the rounds change
    $("per-worker").hidden = false;
    $("heat-score-readout").textContent = `Each worker's history could not be read: ${err.message}`;
  } finally {
    historyBusy = false;
    historyTook = performance.now() - historyAt;
  }
}

// The series each worker has by round (as the server's storage/history.py SERIES).
const HISTORY_SERIES = ["val_accuracy", "val_loss", "train_loss", "train_accuracy", "train_s"];

// ``held`` with the rounds of ``got`` (a v1/dashboard/workers answer from held's round count on) appended to
// every worker's series, and got's latest examples and label counts; null when got cannot extend held (a
// worker held has none of its earlier rounds: it registered or moved onto this page since) and the whole
// history must be fetched again. With nothing held, got (from round 0) is the whole history.
function appendRounds(held, got) {
  if (!held) return got.rounds_from === 0 ? got : null;
  if (got.rounds_from !== held.rounds.length) return null;
  const before = new Map(held.workers.map((w) => [w.worker_id, w]));
  if (!got.workers.every((w) => before.has(w.worker_id))) return null;
  const workers = got.workers.map((w) => {
    const old = before.get(w.worker_id);
    const merged = { ...w };
    for (const name of HISTORY_SERIES) merged[name] = [...old[name], ...w[name]];
    return merged;
  });
  return { ...got, rounds_from: 0, rounds: [...held.rounds, ...got.rounds], workers };
}

function renderHistory(h) {
  workerHistory = h;
  const ws = h.workers;
  $("per-worker").hidden = !ws.length;
  if (!ws.length) return;
  const row = (key) => ws.map((w) => ({ label: w.partition, title: `${w.partition} (${w.name || w.worker_id})`,
    values: w[key] }));
  // A run whose workers hold out no validation split has no val_accuracy: colour by the training loss.
  const hasVal = ws.some((w) => w.val_accuracy.some((v) => v != null));
  if (hasVal) {
    $("heat-title").textContent = "Each worker's validation accuracy by round";
    heat.score.setData(h.rounds, row("val_accuracy"), { label: "validation accuracy", format: pct2, higherIsBetter: true });
  } else {
    $("heat-title").textContent = "Each worker's local training loss by round (no validation split)";
    heat.score.setData(h.rounds, row("train_loss"), { label: "train loss", format: (v) => v.toFixed(4), higherIsBetter: false });
  }
  // The second map would repeat the first when the first already shows the training loss.
  $("heat-loss-panel").hidden = !hasVal;
  heat.loss.setData(h.rounds, row("train_loss"), { label: "train loss", format: (v) => v.toFixed(4), higherIsBetter: false });
  renderLabelMix(h);
}

// Each worker's training examples by class, as one stacked bar a worker (counts only: what the worker sent).
function renderLabelMix(h) {
  const name = (k) => (h.classes && h.classes[k] != null ? h.classes[k] : `class ${k}`);
  const colour = (k) => CLASS_COLORS[k % CLASS_COLORS.length];
  if (!h.workers.some((w) => w.label_counts)) {
    $("label-legend").replaceChildren();
    $("label-mix").replaceChildren(el("p", { class: "empty", text: "No worker has reported its label counts: the "
      + "task does not classify, the run uses differential privacy or secure aggregation (which the counts would "
      + "get around), or the workers are of an older version." }));
    return;
  }
  const classes = Math.max(h.classes ? h.classes.length : 0, ...h.workers.map((w) => (w.label_counts || []).length));
  $("label-legend").replaceChildren(...Array.from({ length: classes }, (_, k) =>
    el("span", {}, el("i", { style: `background: ${colour(k)}` }), name(k))));
  $("label-mix").replaceChildren(...h.workers.map((w) => {
    const counts = w.label_counts || [];
    const n = counts.reduce((a, b) => a + b, 0);
    const segments = counts.flatMap((k, i) => (k ? [el("i", {
      style: `width: ${(100 * k / n).toFixed(3)}%; background: ${colour(i)}`,
      title: `${name(i)}: ${k} (${(100 * k / n).toFixed(1)}%)` })] : []));
    return el("div", { class: "mix-row", dataset: { worker: w.worker_id } },
      el("span", { class: "who mono", text: w.partition, title: w.name || w.worker_id }),
      el("span", { class: "stack" }, ...segments),
      el("span", { class: "n", text: w.examples == null ? "—" : w.examples.toLocaleString("en-US"),
        title: "examples its latest update trained on" }));
  }));
}

// --- workers table --------------------------------------------------------------------------------------
function renderWorkers() {
  const body = $("workers").tBodies[0];
  if (!workers.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "empty", text: "no worker has registered yet" })));
    return;
  }
  const since = (performance.now() - workersAt) / 1000;
  body.replaceChildren(...workers.map((w) => el("tr", { dataset: { worker: w.worker_id } },
    el("td", { class: "mono", text: w.worker_id }),
    el("td", { text: w.name || "—" }),
    el("td", { class: "mono", text: w.partition }),
    el("td", {}, el("span", { class: "badge " + w.status, text: w.status, title: STATUS_HELP[w.status] })),
    el("td", { class: "num", text: w.last_seen_s == null ? "—" : fmt.ago(w.last_seen_s + since) }),
    el("td", { class: "num", text: String(w.rounds_served) }),
    el("td", { class: "num", text: fmt.seconds(w.last_train_s) }),
  )));
}

const STATUS_HELP = {
  idle: "not in the open round",
  training: "sampled in the open round and heard from recently",
  silent: "sampled in the open round, not heard from for longer than a live worker stays quiet: probably "
    + "stopped; the round still waits for it until --worker-timeout",
  dead: "not heard from for longer than --worker-timeout",
};

function renderPager() {
  const { offset, limit, total } = workersPage;
  $("workers-pager").hidden = total <= limit && offset === 0;
  $("workers-shown").textContent = total ? `workers ${Math.min(offset + 1, total)}–${Math.min(offset + limit, total)} of ${total}` : "";
  $("workers-prev").disabled = offset === 0;
  $("workers-next").disabled = offset + limit >= total;
}

function showWorkers(offset) {
  workersOffset = Math.max(0, offset);
  connect();
}

function renderConfig(config) {
  const show = (v) => (v == null ? "default" : typeof v === "object" ? (Object.keys(v).length
    ? Object.entries(v).map(([k, x]) => `${k}=${x}`).join(", ") : "none") : String(v));
  $("config").replaceChildren(...Object.entries(config).map(([k, v]) =>
    el("div", {}, el("span", { class: "k", text: k }), el("span", { class: "v", text: show(v) }))));
}

// --- export ---------------------------------------------------------------------------------------------
// The rounds as CSV: one line a round, the record's numbers with nested ones (timings, the workers' metrics,
// the task's other scores) as "timings.open"-style columns; lists (the confusion matrix) are left out.
function roundsCSV(rows) {
  const flat = rows.map((row) => {
    const out = {};
    for (const [k, v] of Object.entries(row)) {
      if (v != null && typeof v === "object") {
        if (Array.isArray(v)) continue;
        for (const [k2, v2] of Object.entries(v)) if (v2 == null || typeof v2 !== "object") out[`${k}.${k2}`] = v2;
      } else {
        out[k] = v;
      }
    }
    return out;
  });
  const columns = [];
  for (const row of flat) for (const k of Object.keys(row)) if (!columns.includes(k)) columns.push(k);
  const cell = (v) => {
    const t = v == null ? "" : String(v);
    return /[",\n\r]/.test(t) ? `"${t.replace(/"/g, '""')}"` : t;
  };
  return [columns.map(cell).join(","), ...flat.map((row) => columns.map((k) => cell(row[k])).join(","))].join("\n") + "\n";
}

document.querySelectorAll("button.png").forEach((b) => b.addEventListener("click", () => {
  saveCanvas($(b.dataset.canvas), `fedfleet-${runId}-${b.dataset.canvas.replace(/^chart-/, "")}.png`);
}));
$("export-csv").addEventListener("click", () => {
  downloadBlob(new Blob([roundsCSV(rounds)], { type: "text/csv" }), `fedfleet-${runId}-rounds.csv`);
});

// --- the accuracy axis: fitted to the values, or 0-100 % (a 63-65.5 % axis makes noise look dramatic) ----
const SCALE_KEY = "fedfleet.accuracyAxis";
function setScale(full, remember) {
  charts.accuracy.setRange(full ? [0, 1] : null);
  $("scale-full").setAttribute("aria-pressed", String(full));
  $("scale-auto").setAttribute("aria-pressed", String(!full));
  if (remember) {
    try { localStorage.setItem(SCALE_KEY, full ? "full" : "auto"); } catch (_) { /* storage off: not remembered */ }
  }
}
$("scale-auto").addEventListener("click", () => setScale(false, true));
$("scale-full").addEventListener("click", () => setScale(true, true));
let savedScale = null;
try { savedScale = localStorage.getItem(SCALE_KEY); } catch (_) { /* storage off: the default */ }
setScale(savedScale === "full", false);

// --- the event stream -----------------------------------------------------------------------------------
function setConn(kind, text) {
  $("conn").className = "conn " + kind;
  $("conn-text").textContent = text;
}

let source = null;
function connect() {
  if (source) source.close();
  // The first page is the stream's default: no query, one URL for the page as it loads.
  const query = workersOffset ? `?workers_offset=${workersOffset}&workers_limit=${workersPage.limit}` : "";
  const stream = new EventSource("v1/events" + query);
  source = stream;
  stream.addEventListener("state", (e) => {
    const state = JSON.parse(e.data);
    render(state);
    const over = ["finished", "failed", "stopped"].includes(state.status.state);
    if (over) {
      // Nothing more will come: stop listening, or the browser would reconnect forever.
      stream.close();
      // A stopped run is not over for good: its coordinator, started again on its data dir, resumes it.
      const live = state.status.state === "stopped" ? "run stopped (resumable)" : `run ${state.status.state}`;
      setConn("", state.live ? live : `finished run (from its files)`);
    } else if (state.status.waiting) {
      setConn("waiting", "live · waiting for workers");
    } else {
      setConn("live", "live");
    }
  });
  stream.addEventListener("error", () => {
    if (stream.readyState !== EventSource.CLOSED) setConn("lost", "reconnecting…");
  });
}
$("workers-prev").addEventListener("click", () => showWorkers(workersOffset - workersPage.limit));
$("workers-next").addEventListener("click", () => showWorkers(workersOffset + workersPage.limit));
// Served by `fedfleet serve RUNS/` (under /runs/NAME/), the server names the run list these pages come from
// (v1/links): a link back to it, first in the nav. A coordinator's own pages have none.
async function showRunListLink() {
  let links = null;
  try { links = await getJSON("v1/links"); } catch (_) { return; } // an older server: no link, nothing wrong
  // Only a path on this site: the link never leads elsewhere, whatever the answer says.
  if (!links || typeof links.run_list !== "string" || !links.run_list.startsWith("/") || $("run-list-link")) return;
  $("nav").prepend(el("a", { id: "run-list-link", href: links.run_list, text: "All runs" }));
}
// session.js (the sign-in line) may be missing on an older server: the page works without it.
if (typeof showSession === "function") showSession($("session"));
const runListShown = showRunListLink(); // settled once the nav is final (the tests await it)
connect();
// Advance the "last seen" column and the wait's countdown between events; purely local, it asks the
// server nothing.
setInterval(() => { renderWorkers(); renderWaiting(); wantHistory(); }, 1000);
