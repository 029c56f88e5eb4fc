// The live dashboard: state arrives as server-sent events (v1/events) whenever the run changes.
"use strict";

const $ = (id) => document.getElementById(id);
// What the workers reported sits in its own field of a round record, apart from the coordinator's
// own numbers: read it there, by the series' name, and never merge it into the record.
const workerMetric = (name) => (row) => (row.worker_metrics || {})[name];
const charts = {
  accuracy: new LineChart($("chart-accuracy"), {
    percent: true,
    series: [
      { key: "accuracy", label: "test (held-out)", color: "#2563eb" },
      // The model each worker was sent, on its own validation split: the run's only score when it has no
      // held-out set (each site's own data without --test-data).
      { key: "fed_accuracy", label: "validation (workers')", color: "#15803d", dash: [2, 3] },
      { key: "train_accuracy", label: "train (workers')", color: "#e08a0b", dash: [6, 4],
        value: workerMetric("train_accuracy") },
    ],
  }),
  loss: new LineChart($("chart-loss"), {
    series: [
      { key: "loss", label: "test (held-out)", color: "#2563eb" },
      { key: "fed_loss", label: "validation (workers')", color: "#15803d", dash: [2, 3] },
      { key: "train_loss", label: "train (workers')", color: "#e08a0b", dash: [6, 4],
        value: workerMetric("train_loss") },
    ],
  }),
  // Only shown for a run with --dp central. The budget line is set with the run's privacy settings.
  epsilon: new LineChart($("chart-epsilon"), {
    series: [{ key: "dp_epsilon", label: "ε spent", color: "#7c3aed" }],
  }),
};
const EPSILON_SERIES = charts.epsilon.series[0];

let rounds = [];
let workers = [];
let workersAt = 0; // when the worker table arrived: "last seen" counts on from it in the browser
// The state carries one page of the workers (by partition); the pager asks the stream for another.
let workersOffset = 0;
let workersPage = { offset: 0, limit: 100, total: 0 };

function render(state) {
  const s = state.status;
  rounds = rounds.slice(0, state.rounds_from).concat(state.rounds);
  $("run-id").textContent = s.run_id;
  $("run-state").textContent = s.state;
  $("run-state").className = "badge " + s.state;
  $("message").textContent = s.message || "";
  $("message").className = "message " + s.state;
  $("round").textContent = s.round;
  $("rounds").textContent = s.rounds;
  $("round-bar").style.width = Math.min(100, 100 * s.round / Math.max(s.rounds, 1)) + "%";
  $("phase").textContent = s.phase;
  const o = state.open_round;
  $("open-round").textContent = !o ? "" : o.kind === "stats"
    ? `statistics: ${o.answered}/${o.sampled} answered`
    : `round ${o.round}${o.attempt ? ` (attempt ${o.attempt + 1})` : ""}: ${o.answered} of ${o.sampled} answered`;
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
  $("loss").textContent = fmt.num(s.loss, 4);
  $("task").textContent = "task " + s.task;
  $("workers-count").textContent = state.live ? `${s.workers_live} / ${s.workers_registered}` : `— / ${s.workers_registered}`;
  charts.accuracy.setData(rounds, s.rounds);
  charts.loss.setData(rounds, s.rounds);
  renderPrivacy(state.dp, s.rounds);
  workers = state.workers;
  workersAt = performance.now();
  if (state.workers_page) workersPage = state.workers_page;
  renderWorkers();
  renderPager();
  renderConfig(state.config);
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
    el("td", {}, el("span", { class: "badge " + w.status, text: w.status })),
    el("td", { class: "num", text: w.last_seen_s == null ? "—" : fmt.ago(w.last_seen_s + since) }),
    el("td", { class: "num", text: String(w.rounds_served) }),
    el("td", { class: "num", text: fmt.seconds(w.last_train_s) }),
  )));
}

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
connect();
// Advance the "last seen" column between events; purely local, it asks the server nothing.
setInterval(renderWorkers, 1000);
