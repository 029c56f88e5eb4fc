// Small charts on <canvas>, drawn by hand: a line chart (rounds on x, series on y, a legend and a hover
// read-out) and a heat map (rows × rounds). Enough for a dashboard, and nothing to download (no chart
// library, no CDN).
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

// Legend entries laid out in lines that fit `width`: a phone's chart gets two lines instead of a cut one.
function legendLines(g, labels, width) {
  const lines = [[]];
  let x = 0;
  for (const label of labels) {
    const w = 40 + g.measureText(label).width;
    if (x > 0 && x + w - 12 > width) { lines.push([]); x = 0; }
    lines[lines.length - 1].push({ label, x });
    x += w;
  }
  return lines;
}

class LineChart {
  // series: [{key, label, color, dash, value, dots}]; value(row) reads a round's y (default: row[key]), so that a
  // series can come from a nested field such as the workers' metrics; dots: false draws no dots on a line that
  // is not measured per round (a budget). percent: show y as a percentage. Optional, for the dashboard's newer
  // charts: format(v, decimals, step) writes a y value (bytes, seconds; decimals and step are the ticks', null for
  // the read-out); band {lo(row), hi(row), color, label} shades a range behind the lines (the spread of the
  // workers' scores); range [lo, hi] fixes the y axis (null: scaled to the data); floor: the lowest the scaled
  // axis goes (0 for seconds and bytes, which cannot be negative). A series with optional: true is in the legend
  // and read-out only once a round has its value (the coordinator's --server-val scores, which most runs lack).
  constructor(canvas, { series, percent = false, emptyText = "waiting for the first round", format = null,
                        band = null, range = null, floor = null }) {
    this.canvas = canvas;
    this.series = series.map((s) => ({ value: (row) => row[s.key], ...s }));
    this.percent = percent;
    this.emptyText = emptyText;
    this.formatter = format;
    this.band = band;
    this.range = range;
    this.floor = floor;
    this.rows = [];
    this.maxRound = 1;
    this.hover = null;
    this.ticks = []; // the y ticks last drawn: what a test reads to see the axis
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

  setRange(range) {
    this.range = range;
    this.draw();
  }

  // A y value as text: with `decimals` for an axis tick, or precisely for the hover read-out.
  format(v, decimals = null, step = null) {
    if (this.formatter) return this.formatter(v, decimals, step);
    const x = this.percent ? 100 * v : v;
    const text = x.toFixed(decimals == null ? (this.percent ? 2 : 4) : decimals);
    return this.percent ? text + "%" : text;
  }

  layout(top = 30) {
    const w = this.canvas.clientWidth, h = this.canvas.clientHeight;
    return { w, h, left: 56, right: w - 16, top, bottom: h - 34 };
  }

  roundAt(px) {
    const { left, right } = this.layout();
    if (!this.rows.length) return null;
    const r = Math.round(1 + (px - left) / (right - left) * Math.max(this.maxRound - 1, 1));
    return this.rows.find((row) => row.round === r) ? r : null;
  }

  // The y range the axis covers: fixed, or the data's (series and band) with a margin; a percentage never
  // runs below 0 % or above 100 %. null when there is nothing to scale to (an empty chart).
  yRange() {
    let lo = Infinity, hi = -Infinity;
    const see = (v) => { if (v != null) { lo = Math.min(lo, v); hi = Math.max(hi, v); } };
    // A loop, not Math.min(...values): a long run has more values than a call may take arguments.
    for (const row of this.rows) {
      for (const s of this.series) see(s.value(row));
      if (this.band) { see(this.band.lo(row)); see(this.band.hi(row)); }
    }
    if (this.range) return [Math.min(this.range[0], lo), Math.max(this.range[1], hi)];
    if (lo > hi) return null;
    const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.1 || 0.1;
    if (this.percent) return [Math.max(0, lo - pad), Math.min(1, hi + pad)];
    return this.floor != null ? [Math.max(this.floor, lo - pad), hi + pad] : [lo - pad, hi + pad];
  }

  draw() {
    const c = this.canvas, dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth, h = c.clientHeight;
    if (w === 0 || h === 0) return;
    c.width = Math.round(w * dpr);
    c.height = Math.round(h * dpr);
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    g.font = "12px system-ui, sans-serif";
    const shown = this.shownSeries();
    const legend = legendLines(g, shown.map((s) => s.label).concat(this.band ? [this.band.label] : []),
      w - 16 - 56);
    const L = this.layout(14 + 18 * legend.length);

    const yr = this.yRange();
    // An empty chart gets no y axis: a made-up range (−50 % to 150 %) would read as data.
    const yt = yr ? niceTicks(yr[0], yr[1], 5) : [];
    this.ticks = yt;
    const y0 = yt.length ? yt[0] : 0, y1 = yt.length ? yt[yt.length - 1] : 1;
    const tickDecimals = yt.length > 1 ? decimalsFor((yt[1] - yt[0]) * (this.percent ? 100 : 1)) : 0;
    const xt = niceTicks(1, this.maxRound, Math.min(8, Math.max(this.maxRound - 1, 1))).filter((r) => r >= 1 && Number.isInteger(r));
    const X = (r) => L.left + (r - 1) / Math.max(this.maxRound - 1, 1) * (L.right - L.left);
    const Y = (v) => L.bottom - (v - y0) / (y1 - y0) * (L.bottom - L.top);

    // grid and axes
    g.strokeStyle = "#e5e9f0"; g.lineWidth = 1; g.fillStyle = "#637083";
    g.textAlign = "right"; g.textBaseline = "middle";
    for (const v of yt) {
      const y = Math.round(Y(v)) + 0.5;
      g.beginPath(); g.moveTo(L.left, y); g.lineTo(L.right, y); g.stroke();
      g.fillText(this.format(v, tickDecimals, yt[1] - yt[0]), L.left - 8, y);
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

    this.drawLegend(g, legend, L.left);

    if (!this.rows.length) {
      g.fillStyle = "#94a3b8"; g.textAlign = "center"; g.textBaseline = "middle";
      g.fillText(this.emptyText, (L.left + L.right) / 2, (L.top + L.bottom) / 2);
      return;
    }

    if (this.band) this.drawBand(g, X, Y);

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

    if (this.hover != null) this.drawHover(g, L, X);
  }

  // The series the legend and read-out name: every one but an optional series no round has a value of.
  shownSeries() {
    return this.series.filter((s) => !s.optional || this.rows.some((row) => s.value(row) != null));
  }

  drawLegend(g, lines, left) {
    const bandLabel = this.band ? this.band.label : null;
    g.textAlign = "left"; g.textBaseline = "middle";
    lines.forEach((line, i) => {
      const y = 12 + 18 * i;
      for (const { label, x } of line) {
        const s = this.series.find((t) => t.label === label);
        if (s) {
          g.strokeStyle = s.color; g.lineWidth = 2.5; g.setLineDash(s.dash || []);
          g.beginPath(); g.moveTo(left + x, y); g.lineTo(left + x + 22, y); g.stroke();
          g.setLineDash([]);
        } else if (label === bandLabel) {
          g.fillStyle = this.band.color; g.fillRect(left + x, y - 6, 22, 12);
        }
        g.fillStyle = "#334155"; g.fillText(label, left + x + 28, y);
      }
    });
  }

  // The band: a filled area between lo and hi over the rounds that have both (gaps split it).
  drawBand(g, X, Y) {
    const { lo, hi, color } = this.band;
    let run = [];
    const flush = () => {
      if (run.length) {
        g.beginPath();
        run.forEach((row, i) => (i ? g.lineTo(X(row.round), Y(hi(row))) : g.moveTo(X(row.round), Y(hi(row)))));
        for (let i = run.length - 1; i >= 0; i--) g.lineTo(X(run[i].round), Y(lo(run[i])));
        g.closePath(); g.fillStyle = color; g.fill();
        if (run.length === 1) g.fillRect(X(run[0].round) - 2, Y(hi(run[0])), 4, Y(lo(run[0])) - Y(hi(run[0])));
      }
      run = [];
    };
    for (const row of this.rows) {
      if (lo(row) != null && hi(row) != null) run.push(row); else flush();
    }
    flush();
  }

  // hover read-out: a guide line and a box with the round's values
  drawHover(g, L, X) {
    const row = this.rows.find((r) => r.round === this.hover);
    const x = X(row.round);
    g.strokeStyle = "#94a3b8"; g.lineWidth = 1; g.setLineDash([3, 3]);
    g.beginPath(); g.moveTo(x, L.top); g.lineTo(x, L.bottom); g.stroke(); g.setLineDash([]);
    const lines = [`round ${row.round}`, ...this.shownSeries().map((s) => {
      const v = s.value(row);
      return `${s.label}: ${v == null ? "—" : this.format(v)}`;
    })];
    if (this.band && this.band.lo(row) != null) {
      lines.push(`${this.band.label}: ${this.format(this.band.lo(row))} – ${this.format(this.band.hi(row))}`);
    }
    const bw = Math.max(...lines.map((t) => g.measureText(t).width)) + 16, bh = lines.length * 17 + 8;
    const bx = x + bw + 12 > L.right ? Math.max(0, x - bw - 8) : x + 8, by = L.top + 4;
    g.fillStyle = "rgba(17, 24, 39, .88)"; g.fillRect(bx, by, bw, bh);
    g.fillStyle = "#f8fafc"; g.textAlign = "left"; g.textBaseline = "top";
    lines.forEach((t, i) => g.fillText(t, bx + 8, by + 6 + i * 17));
  }
}

// Viridis, sampled: dark for the low end, yellow for the high; it reads in grey and to colour-blind eyes.
const RAMP = [[68, 1, 84], [65, 68, 135], [42, 120, 142], [34, 168, 132], [122, 209, 81], [253, 231, 37]];

function rampRGB(t) {
  const x = Math.min(1, Math.max(0, t)) * (RAMP.length - 1);
  const i = Math.min(Math.floor(x), RAMP.length - 2), f = x - i;
  const [a, b] = [RAMP[i], RAMP[i + 1]];
  return a.map((v, k) => Math.round(v + (b[k] - v) * f));
}

function rampColor(t) { return `rgb(${rampRGB(t).join(",")})`; }

const MISSING_RGB = [238, 241, 245]; // a cell with no update: the page's light grey

class HeatMap {
  // A grid of rows (workers) × columns (rounds), each cell coloured by its value on one scale for the whole
  // grid, so that a worker that learns less than the others stands out. readout: an element that says what
  // the cell under the pointer (or the one tapped) holds.
  constructor(canvas, { readout = null, emptyText = "no worker has sent an update yet" } = {}) {
    this.canvas = canvas;
    this.readout = readout;
    this.emptyText = emptyText;
    this.columns = [];
    this.rows = [];
    this.options = { label: "", format: String, higherIsBetter: true };
    this.hover = null;
    const point = (e) => { this.hover = this.cellAt(e.offsetX, e.offsetY); this.say(); this.draw(); };
    canvas.addEventListener("mousemove", point);
    canvas.addEventListener("click", point); // a tap on a phone
    canvas.addEventListener("mouseleave", () => { this.hover = null; this.draw(); });
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  // columns: round numbers; rows: [{label, title, values: [v or null per column]}]; options: {label (what the
  // values are), format(v), higherIsBetter (false for a loss: its low end gets the bright colour)}.
  setData(columns, rows, options) {
    this.columns = columns;
    this.rows = rows;
    this.options = { ...this.options, ...options };
    let lo = Infinity, hi = -Infinity;
    for (const row of rows) for (const v of row.values) if (v != null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    this.lo = lo; this.hi = hi;
    // As tall as its rows need (thin rows for many workers), so that every worker stays on the page.
    this.canvas.style.height = `${this.layout().h}px`;
    if (this.hover && (this.hover.row >= rows.length || this.hover.col >= columns.length)) this.hover = null;
    this.grid = null;
    this.say();
    this.draw();
  }

  rowHeight() { return this.rows.length <= 12 ? 22 : Math.max(5, Math.min(22, Math.floor(420 / this.rows.length))); }

  layout() {
    const w = this.canvas.clientWidth;
    const g = this.canvas.getContext("2d");
    g.font = "11px system-ui, sans-serif";
    const widest = Math.max(0, ...this.rows.map((r) => g.measureText(r.label).width));
    const left = Math.min(widest, w * 0.35) + 10;
    const top = 34, rh = this.rowHeight();
    return { w, left, right: w - 8, top, rh, bottom: top + rh * Math.max(this.rows.length, 1), h: top + rh * Math.max(this.rows.length, 1) + 24 };
  }

  // The cell under a point of the canvas (CSS pixels), or null.
  cellAt(px, py) {
    const L = this.layout();
    if (!this.columns.length || px < L.left || px >= L.right || py < L.top || py >= L.bottom) return null;
    const col = Math.floor((px - L.left) / (L.right - L.left) * this.columns.length);
    const row = Math.floor((py - L.top) / L.rh);
    return row < this.rows.length ? { row, col } : null;
  }

  // Where a cell's centre is (CSS pixels): for a pointer, or a test, to aim at.
  cellCentre(row, col) {
    const L = this.layout();
    const cw = (L.right - L.left) / this.columns.length;
    return { x: L.left + (col + 0.5) * cw, y: L.top + (row + 0.5) * L.rh };
  }

  // 0 for the worst value on the grid, 1 for the best.
  score(v) {
    const t = this.hi > this.lo ? (v - this.lo) / (this.hi - this.lo) : 1;
    return this.options.higherIsBetter ? t : 1 - t;
  }

  say() {
    if (!this.readout) return;
    const { label, format } = this.options;
    if (!this.hover) {
      this.readout.textContent = this.rows.length ? "Point at (or tap) a cell to read it." : "";
      return;
    }
    const row = this.rows[this.hover.row], v = row.values[this.hover.col];
    this.readout.textContent = `${row.title} · round ${this.columns[this.hover.col]}: `
      + (v == null ? "no update in this round" : `${label} ${format(v)}`);
  }

  draw() {
    const c = this.canvas, dpr = window.devicePixelRatio || 1;
    const L = this.layout();
    const h = c.clientHeight;
    if (L.w === 0 || h === 0) return;
    const width = Math.round(L.w * dpr), height = Math.round(h * dpr);
    // The grid is painted once for each data or size (a long run has 100 workers × thousands of rounds);
    // moving the pointer only copies it and outlines a cell.
    if (!this.grid || this.grid.width !== width || this.grid.height !== height) {
      this.grid = document.createElement("canvas");
      this.grid.width = width; this.grid.height = height;
      const gg = this.grid.getContext("2d");
      gg.setTransform(dpr, 0, 0, dpr, 0, 0);
      this.paint(gg, L, h);
    }
    c.width = width; c.height = height;
    const g = c.getContext("2d");
    g.drawImage(this.grid, 0, 0);
    if (this.hover && this.columns.length) {
      const cw = (L.right - L.left) / this.columns.length;
      g.setTransform(dpr, 0, 0, dpr, 0, 0);
      g.strokeStyle = "#111827"; g.lineWidth = 2;
      g.strokeRect(L.left + this.hover.col * cw, L.top + this.hover.row * L.rh, Math.max(cw, 2), L.rh);
    }
  }

  paint(g, L, h) {
    g.font = "11px system-ui, sans-serif";
    if (!this.rows.length || !this.columns.length) {
      g.fillStyle = "#94a3b8"; g.textAlign = "center"; g.textBaseline = "middle";
      g.font = "12px system-ui, sans-serif";
      g.fillText(this.emptyText, L.w / 2, h / 2);
      return;
    }
    this.drawLegend(g, L);
    const cw = (L.right - L.left) / this.columns.length;
    g.fillStyle = "#334155"; g.textAlign = "right"; g.textBaseline = "middle";
    if (L.rh >= 10) {
      this.rows.forEach((row, i) => g.fillText(fitText(g, row.label, L.left - 10), L.left - 6, L.top + (i + 0.5) * L.rh));
    }
    // One pixel a cell in an image, stretched over the grid without smoothing: 100 workers × 2,000 rounds
    // take milliseconds this way, where a fillRect a cell took over half a second.
    const cells = new ImageData(this.columns.length, this.rows.length);
    this.rows.forEach((row, i) => row.values.forEach((v, j) => {
      cells.data.set([...(v == null ? MISSING_RGB : rampRGB(this.score(v))), 255], 4 * (i * this.columns.length + j));
    }));
    const img = document.createElement("canvas");
    img.width = cells.width; img.height = cells.height;
    img.getContext("2d").putImageData(cells, 0, 0);
    g.imageSmoothingEnabled = false;
    g.drawImage(img, L.left, L.top, L.right - L.left, L.rh * this.rows.length);
    if (L.rh >= 10) { // a white line between rows, where they are tall enough to spare it
      g.fillStyle = "#ffffff";
      for (let i = 1; i <= this.rows.length; i++) g.fillRect(L.left, L.top + i * L.rh - 1, L.right - L.left, 1);
    }
    // a few round numbers under the grid
    g.fillStyle = "#637083"; g.textAlign = "center"; g.textBaseline = "top";
    const n = this.columns.length;
    const every = Math.max(1, Math.ceil(n / Math.max(2, Math.floor((L.right - L.left) / 46))));
    for (let j = 0; j < n; j += every) g.fillText(String(this.columns[j]), L.left + (j + 0.5) * cw, L.bottom + 5);
  }

  // The scale: the worst value on the left, the best on the right, and the colour of a missing update.
  drawLegend(g, L) {
    const { label, format } = this.options;
    const worst = this.options.higherIsBetter ? this.lo : this.hi, best = this.options.higherIsBetter ? this.hi : this.lo;
    g.textBaseline = "middle"; g.textAlign = "left"; g.fillStyle = "#334155";
    let x = 0;
    const y = 12;
    const text = (t) => { g.fillText(t, x, y); x += g.measureText(t).width + 6; };
    text(format(worst));
    const ramp = Math.min(120, Math.max(40, L.w * 0.25));
    for (let i = 0; i < ramp; i++) { g.fillStyle = rampColor(i / (ramp - 1)); g.fillRect(x + i, y - 6, 1.5, 12); }
    x += ramp + 6;
    g.fillStyle = "#334155";
    text(format(best));
    // What the colours are, and the missing-update swatch, where they fit (the caption says it too).
    const what = `${label}${this.options.higherIsBetter ? "" : " (lower is better)"}`;
    if (x + g.measureText(what).width < L.w) text(what);
    if (x + 26 + g.measureText("no update").width < L.w) {
      g.fillStyle = "#eef1f5"; g.fillRect(x + 4, y - 6, 12, 12); x += 20;
      g.fillStyle = "#637083"; text("no update");
    }
  }
}

// `text` shortened with an ellipsis to fit `width` pixels.
function fitText(g, text, width) {
  if (g.measureText(text).width <= width) return text;
  let t = text;
  while (t.length > 1 && g.measureText(t + "…").width > width) t = t.slice(0, -1);
  return t + "…";
}

// Download a canvas as a PNG on a white background (a chart's own background is transparent, which most
// viewers show as black or as a checkerboard).
function saveCanvas(canvas, filename) {
  const out = document.createElement("canvas");
  out.width = canvas.width; out.height = canvas.height;
  const g = out.getContext("2d");
  g.fillStyle = "#ffffff"; g.fillRect(0, 0, out.width, out.height);
  g.drawImage(canvas, 0, 0);
  out.toBlob((blob) => downloadBlob(blob, filename), "image/png");
}

function downloadBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url; a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  // Freed later, not at once: the browser reads the blob after click() returns.
  setTimeout(() => URL.revokeObjectURL(url), 30_000);
}
