// A small line chart on <canvas>, drawn by hand: rounds on x, one or more series on y, a legend and a
// hover read-out. Enough for a dashboard, and nothing to download (no chart library, no CDN).
"use strict";

// Decimals that tell ticks `step` apart: 0.002 apart needs 3, 0.5 apart needs 1.
function decimalsFor(step) { return Math.max(0, -Math.floor(Math.log10(step) + 1e-9)); }

// Round numbers for axis ticks: about `count` steps of 1, 2 or 5 × 10^k covering [lo, hi].
function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag;
  const first = Math.floor(lo / step) * step;
  const ticks = [];
  for (let v = first; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toFixed(10)));
  if (ticks[ticks.length - 1] < hi) ticks.push(ticks[ticks.length - 1] + step);
  return ticks;
}

class LineChart {
  // series: [{key, label, color, dash, value, dots}]; value(row) reads a round's y (default: row[key]), so that a
  // series can come from a nested field such as the workers' metrics; dots: false draws no dots on a line that
  // is not measured per round (a budget). percent: show y as a percentage.
  constructor(canvas, { series, percent = false, emptyText = "waiting for the first round" }) {
    this.canvas = canvas;
    this.series = series.map((s) => ({ value: (row) => row[s.key], ...s }));
    this.percent = percent;
    this.emptyText = emptyText;
    this.rows = [];
    this.maxRound = 1;
    this.hover = null;
    canvas.addEventListener("mousemove", (e) => { this.hover = this.roundAt(e.offsetX); this.draw(); });
    canvas.addEventListener("mouseleave", () => { this.hover = null; this.draw(); });
    // Redraw at the new size (and pixel ratio) when the layout changes; no timers involved.
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  // rows: round records ({round, accuracy, ...}); planned: rounds in the run. The x axis grows with the
  // rounds done (at least 10, or the whole of a shorter run), so a long run's first rounds are not
  // squeezed into its left edge; the progress bar above shows how far the run is.
  setData(rows, planned) {
    this.rows = rows;
    const last = rows.length ? rows[rows.length - 1].round : 1;
    this.maxRound = Math.max(last, Math.min(planned || 1, 10), 1);
    this.draw();
  }

  // A y value as text: with `decimals` for an axis tick, or precisely for the hover read-out.
  format(v, decimals = null) {
    const x = this.percent ? 100 * v : v;
    const text = x.toFixed(decimals == null ? (this.percent ? 2 : 4) : decimals);
    return this.percent ? text + "%" : text;
  }

  layout() {
    const w = this.canvas.clientWidth, h = this.canvas.clientHeight;
    return { w, h, left: 56, right: w - 16, top: 30, bottom: h - 34 };
  }

  roundAt(px) {
    const { left, right } = this.layout();
    if (!this.rows.length) return null;
    const r = Math.round(1 + (px - left) / (right - left) * Math.max(this.maxRound - 1, 1));
    return this.rows.find((row) => row.round === r) ? r : null;
  }

  draw() {
    const c = this.canvas, dpr = window.devicePixelRatio || 1;
    const L = this.layout();
    if (L.w === 0 || L.h === 0) return;
    c.width = Math.round(L.w * dpr);
    c.height = Math.round(L.h * dpr);
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, L.w, L.h);
    g.font = "12px system-ui, sans-serif";

    // A loop, not Math.min(...values): a long run has more values than a call may take arguments.
    let lo = Infinity, hi = -Infinity;
    for (const row of this.rows) {
      for (const s of this.series) {
        const v = s.value(row);
        if (v != null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
      }
    }
    if (lo > hi) { lo = 0; hi = 1; }
    const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.1 || 0.1;
    const yt = niceTicks(lo - pad, hi + pad, 5);
    const y0 = yt[0], y1 = yt[yt.length - 1];
    const tickDecimals = decimalsFor((yt[1] - yt[0]) * (this.percent ? 100 : 1));
    const xt = niceTicks(1, this.maxRound, Math.min(8, Math.max(this.maxRound - 1, 1))).filter((r) => r >= 1 && Number.isInteger(r));
    const X = (r) => L.left + (r - 1) / Math.max(this.maxRound - 1, 1) * (L.right - L.left);
    const Y = (v) => L.bottom - (v - y0) / (y1 - y0) * (L.bottom - L.top);

    // grid and axes
    g.strokeStyle = "#e5e9f0"; g.lineWidth = 1; g.fillStyle = "#637083";
    g.textAlign = "right"; g.textBaseline = "middle";
    for (const v of yt) {
      const y = Math.round(Y(v)) + 0.5;
      g.beginPath(); g.moveTo(L.left, y); g.lineTo(L.right, y); g.stroke();
      g.fillText(this.format(v, tickDecimals), L.left - 8, y);
    }
    g.textAlign = "center"; g.textBaseline = "top";
    for (const r of xt) {
      if (r > this.maxRound) continue;
      const x = Math.round(X(r)) + 0.5;
      g.beginPath(); g.moveTo(x, L.bottom); g.lineTo(x, L.bottom + 4); g.strokeStyle = "#c4ccd8"; g.stroke();
      g.fillText(String(r), x, L.bottom + 7);
    }
    g.fillText("round", (L.left + L.right) / 2, L.bottom + 20);
    g.strokeStyle = "#c4ccd8";
    g.beginPath(); g.moveTo(L.left + 0.5, L.top); g.lineTo(L.left + 0.5, L.bottom + 0.5); g.lineTo(L.right, L.bottom + 0.5); g.stroke();

    // legend
    let lx = L.left;
    g.textAlign = "left"; g.textBaseline = "middle";
    for (const s of this.series) {
      g.strokeStyle = s.color; g.lineWidth = 2.5; g.setLineDash(s.dash || []);
      g.beginPath(); g.moveTo(lx, 12); g.lineTo(lx + 22, 12); g.stroke();
      g.setLineDash([]);
      g.fillStyle = "#334155"; g.fillText(s.label, lx + 28, 12);
      lx += 40 + g.measureText(s.label).width;
    }

    if (!this.rows.length) {
      g.fillStyle = "#94a3b8"; g.textAlign = "center";
      g.fillText(this.emptyText, (L.left + L.right) / 2, (L.top + L.bottom) / 2);
      return;
    }

    // series: a line through the rounds that have the value, and dots while there are few rounds
    for (const s of this.series) {
      const pts = this.rows.filter((row) => s.value(row) != null).map((row) => [X(row.round), Y(s.value(row))]);
      g.strokeStyle = s.color; g.lineWidth = 2.2; g.setLineDash(s.dash || []); g.lineJoin = "round";
      g.beginPath();
      pts.forEach(([x, y], i) => (i ? g.lineTo(x, y) : g.moveTo(x, y)));
      g.stroke(); g.setLineDash([]);
      if (pts.length <= 40 && s.dots !== false) {
        g.fillStyle = s.color;
        for (const [x, y] of pts) { g.beginPath(); g.arc(x, y, 3, 0, 2 * Math.PI); g.fill(); }
      }
    }

    // hover read-out: a guide line and a box with the round's values
    if (this.hover != null) {
      const row = this.rows.find((r) => r.round === this.hover);
      const x = X(row.round);
      g.strokeStyle = "#94a3b8"; g.lineWidth = 1; g.setLineDash([3, 3]);
      g.beginPath(); g.moveTo(x, L.top); g.lineTo(x, L.bottom); g.stroke(); g.setLineDash([]);
      const lines = [`round ${row.round}`, ...this.series.map((s) => {
        const v = s.value(row);
        return `${s.label}: ${v == null ? "—" : this.format(v)}`;
      })];
      const bw = Math.max(...lines.map((t) => g.measureText(t).width)) + 16, bh = lines.length * 17 + 8;
      const bx = x + bw + 12 > L.right ? x - bw - 8 : x + 8, by = L.top + 4;
      g.fillStyle = "rgba(17, 24, 39, .88)"; g.fillRect(bx, by, bw, bh);
      g.fillStyle = "#f8fafc"; g.textAlign = "left"; g.textBaseline = "top";
      lines.forEach((t, i) => g.fillText(t, bx + 8, by + 6 + i * 17));
    }
  }
}
