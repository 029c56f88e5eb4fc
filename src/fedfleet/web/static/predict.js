// The prediction page: a form built from the task's features (v1/predict), its answer as bars or a value,
// and, when the task offers it (the songs task), a search of the data set (v1/songs) that fills the form.
"use strict";

const $ = (id) => document.getElementById(id);
const MANY_VALUES = 100; // past this many values a category is typed (with suggestions), not picked from a list
let info = null;         // v1/predict: the task, its classes (or regression) and its features
const inputs = new Map(); // feature name -> its input or select
let picked = null;       // the song chosen from the data set, while its features are unchanged
let searchSeq = 0;       // answers to an older search are dropped when a newer one was sent

function showError(text) { $("error").textContent = text || ""; }

function number(x) { return Number(x).toLocaleString("en", { maximumSignificantDigits: 6 }); }

function formHint() {
  return info.song_search ? "Pick a song above, or enter values by hand."
    : "Leave a field empty and the model takes the training data's mean (a number) or none of its values (a category).";
}

function describePage() {
  const target = info.target ? ` ${info.target}` : "";
  if (info.song_search) {
    $("title").textContent = "Which era is this song from?";
    $("lede").textContent = "Pick a song from the data set, or type in its audio features, and the current global "
      + `model says which era it sounds like: ${info.classes.join(", ")}.`;
  } else if (info.problem === "regression") {
    $("title").textContent = `Predict${target || " a value"}`;
    $("lede").textContent = `Fill in a row's features and the current global model predicts its${target || " value"}.`;
  } else {
    $("title").textContent = `Predict${target || " a class"}`;
    $("lede").textContent = "Fill in a row's features and the current global model gives the probability of each "
      + `class: ${info.classes.join(", ")}.`;
  }
  $("predict-button").textContent = info.target ? `Predict ${info.target}` : "Predict";
  $("form-hint").textContent = formHint();
}

// A feature's form control, the line under it, its tooltip and (a category of many values) its suggestions.
function numberField(f) {
  const unit = f.unit ? ` ${f.unit}` : "";
  const limits = f.limits ? ` It can be ${number(f.limits[0])} to ${number(f.limits[1])}${unit}.` : "";
  const title = (f.description ? f.description + ". " : "") + `In the training data: ${number(f.min)} to `
    + `${number(f.max)}${unit}, mean ${number(f.mean)}.` + limits;
  const input = el("input", { id: "f-" + f.name, name: f.name, type: "text", inputmode: "decimal", title,
                              placeholder: number(f.mean), required: f.required ? "" : null });
  return { input, title, hint: `${number(f.min)} to ${number(f.max)}${unit}` + (f.required ? " · required" : "") };
}

function categoryField(f) {
  const title = (f.description ? f.description + ". " : "") + `${f.values.length} values; any other is "other".`;
  const hint = `${f.values.length} value${f.values.length === 1 ? "" : "s"}` + (f.required ? " · required" : "");
  if (f.values.length > MANY_VALUES) {
    const input = el("input", { id: "f-" + f.name, name: f.name, type: "text", list: "v-" + f.name, title,
                                autocomplete: "off", placeholder: "type a value" });
    const list = el("datalist", { id: "v-" + f.name }, ...f.values.map((v) => el("option", { value: v })));
    return { input, title, hint, list };
  }
  const input = el("select", { id: "f-" + f.name, name: f.name, title },
    el("option", { value: "", text: "— not given —" }), ...f.values.map((v) => el("option", { value: v, text: v })));
  return { input, title, hint };
}

function buildForm() {
  inputs.clear();
  $("fields").replaceChildren(...info.features.map((f) => {
    const { input, title, hint, list } = f.kind === "number" ? numberField(f) : categoryField(f);
    inputs.set(f.name, input);
    input.addEventListener(input.tagName === "SELECT" ? "change" : "input", () => {
      input.classList.remove("invalid");
      if (picked) { picked = null; $("form-hint").textContent = "Features edited by hand."; }
    });
    return el("div", { class: "field" }, el("label", { for: "f-" + f.name, text: f.name, title }), input,
      list || "", el("div", { class: "range", text: hint }));
  }));
}

function readForm() {
  const row = {};
  for (const f of info.features) {
    const text = inputs.get(f.name).value.trim();
    if (text === "") continue; // missing: the model imputes it, or the server says it is required
    // Send what was typed: a value that is not a number is the server's to explain, in one place.
    row[f.name] = f.kind === "number" && !isNaN(Number(text)) ? Number(text) : text;
  }
  return row;
}

function clearResult() {
  $("predicted").textContent = "No prediction yet.";
  $("predicted").className = "predicted none";
  for (const id of ["truth", "probabilities", "notes"]) $(id).replaceChildren();
}

function clearMarks() { for (const input of inputs.values()) input.classList.remove("invalid"); }

// A 422 lists each problem with the features it is about: say them in words and mark those fields.
function explain(err) {
  const problems = err.body && err.body.problems;
  if (err.status !== 422 || !problems) return err.status === 422 ? `The server could not use this request: ${err.message}` : err.message;
  for (const p of problems) for (const name of p.features) if (inputs.has(name)) inputs.get(name).classList.add("invalid");
  const what = problems.map((p) => p.message.charAt(0).toUpperCase() + p.message.slice(1)).join(". ");
  return `These values cannot be predicted from. ${what}.`;
}

async function predict() {
  showError("");
  clearMarks();
  $("predict-button").disabled = true;
  try {
    const res = await getJSON("v1/predict", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ rows: [readForm()] }),
    });
    showPrediction(res);
  } catch (err) {
    clearResult(); // an answer shown now would be for other values than those in the form
    showError(explain(err));
  } finally {
    $("predict-button").disabled = false;
  }
}

function showNotes(p) {
  const notes = [];
  const byName = new Map(info.features.map((f) => [f.name, f]));
  const numbers = p.missing.filter((name) => byName.get(name).kind === "number");
  const categories = p.missing.filter((name) => byName.get(name).kind === "category");
  if (numbers.length) notes.push(`Not given, so the model took the training data's mean: ${numbers.join(", ")}.`);
  if (categories.length) notes.push(`Not given, so the model took none of their values: ${categories.join(", ")}.`);
  for (const [name, value] of Object.entries(p.other)) {
    notes.push(`${name} = “${value}” is not a value the model knows, so it was taken as “other”.`);
  }
  $("notes").replaceChildren(...notes.map((text) => el("li", { text })));
}

function showPrediction(res) {
  const p = res.predictions[0];
  $("truth").replaceChildren();
  $("probabilities").replaceChildren();
  $("predicted").className = "predicted";
  if (res.problem === "regression") {
    $("predicted").textContent = number(p.value);
  } else {
    $("predicted").textContent = p.class;
    const top = Math.max(...Object.values(p.probabilities));
    $("probabilities").replaceChildren(...res.classes.map((name) => {
      const v = p.probabilities[name];
      return el("div", { class: "prob" + (v === top ? " best" : ""), dataset: { class: name } },
        el("span", { class: "name", text: name, title: name }),
        el("div", { class: "bar" }, el("div", { style: `width: ${(100 * v).toFixed(1)}%` })),
        el("span", { class: "pct", text: (100 * v).toFixed(1) + "%" }));
    }));
  }
  if (picked) {
    const right = picked.era === p.class;
    $("truth").append("In the data set: ", el("b", { text: picked.era }), " — ",
      el("span", { class: right ? "right" : "wrong", text: right ? "the model is right" : "the model is wrong" }),
      picked.held_out ? " (a held-out song: no worker trained on it)" : " (a training song)");
  }
  showNotes(p);
  $("model-info").textContent = modelText(res);
}

function modelText(m) {
  return m.round === 0 ? `The model has not been trained yet (version ${m.model_version}).`
    : `Global model after round ${m.round} (version ${m.model_version}).`;
}

function pick(song) {
  picked = song;
  for (const f of info.features) inputs.get(f.name).value = String(song.features[f.name]);
  clearMarks();
  $("form-hint").replaceChildren(el("b", { text: song.title }), ` by ${song.artist}`);
  $("song-results").replaceChildren();
  $("search-hint").textContent = `${song.title} by ${song.artist}, ${song.era} in the data set.`;
  $("song-search").value = `${song.title} — ${song.artist}`;
  predict();
}

async function search() {
  const q = $("song-search").value.trim();
  const seq = ++searchSeq;
  if (!q) { $("song-results").replaceChildren(); $("search-hint").textContent = ""; return; }
  try {
    const res = await getJSON(`v1/songs?q=${encodeURIComponent(q)}&limit=8`);
    if (seq !== searchSeq) return;
    $("search-hint").textContent = res.total === 0 ? "No song matches." : res.total > res.songs.length
      ? `${res.total} songs match; the first ${res.songs.length} are shown.` : `${res.total} song${res.total > 1 ? "s" : ""} match.`;
    $("song-results").replaceChildren(...res.songs.map((song, i) => {
      const li = el("li", { role: "option", class: i === 0 ? "active" : null, dataset: { uri: song.uri } },
        el("span", { class: "title", text: song.title }), el("span", { class: "artist", text: song.artist }),
        el("span", { class: "meta", text: song.era + (song.held_out ? " · held out" : "") }));
      li.addEventListener("click", () => pick(song));
      li.song = song;
      return li;
    }));
  } catch (err) {
    if (seq === searchSeq) showError(err.message);
  }
}

function startSearch() {
  $("search-panel").hidden = false;
  let timer = null;
  // Wait for a pause in typing (150 ms) so that a word typed fast is one search, not one per letter.
  $("song-search").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(search, 150); });
  $("song-search").addEventListener("keydown", (e) => {
    const first = $("song-results").querySelector("li.active") || $("song-results").firstElementChild;
    if (e.key === "Enter" && first) { e.preventDefault(); pick(first.song); }
  });
}

async function start() {
  try {
    info = await getJSON("v1/predict");
  } catch (err) {
    showError(`This run cannot predict: ${err.message}`);
    $("predict-button").disabled = true;
    $("clear-button").disabled = true;
    return;
  }
  $("model-badge").textContent = info.round === 0 ? "model: untrained" : `model: round ${info.round}`;
  $("model-info").textContent = modelText(info);
  describePage();
  buildForm();
  if (info.song_search) startSearch();
  $("features").addEventListener("submit", (e) => { e.preventDefault(); predict(); });
  $("clear-button").addEventListener("click", () => {
    for (const input of inputs.values()) input.value = "";
    clearMarks();
    clearResult();
    picked = null;
    $("form-hint").textContent = formHint();
    showError("");
  });
}

start();
