// The prediction page: a form built from the task's features (v1/predict), its answer as bars or a value,
// and, when the task offers it (the songs task), a search of the data set (v1/songs) that fills the form.
"use strict";

const $ = (id) => document.getElementById(id);
const MANY_VALUES = 100; // past this many values a category is typed (with suggestions), not picked from a list
const SHOWN_CHARS = 40;  // of a value typed by hand, repeated in a message
const SEARCH_HINT = "Every word must appear in the title or the artist.";
let info = null;          // v1/predict: the task, its classes (or regression) and its features
let byName = new Map();   // feature name -> its schema
const inputs = new Map(); // feature name -> its input or select
let picked = null;        // the song chosen from the data set, while its features are unchanged
// Answers to an older request are dropped when a newer one was sent (or Clear pressed): the first search
// can take seconds, and a fast typist's earlier words must not overwrite the later ones.
let searchSeq = 0;
let predictSeq = 0;
let active = -1;          // the highlighted option of the search's list, moved by the arrow keys

function showError(text) { $("error").textContent = text || ""; }

function number(x) { return Number(x).toLocaleString("en", { maximumSignificantDigits: 6 }); }

function capital(text) { return text.charAt(0).toUpperCase() + text.slice(1); }

function shown(text) { return text.length > SHOWN_CHARS ? text.slice(0, SHOWN_CHARS) + "…" : text; }

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

// The model an answer came from: the header and the result say the same round, the latest answer's.
function showModel(m) {
  $("model-badge").textContent = m.round === 0 ? "model: untrained" : `model: round ${m.round}`;
  $("model-info").textContent = m.round === 0 ? `The model has not been trained yet (version ${m.model_version}).`
    : `Global model after round ${m.round} (version ${m.model_version}).`;
}

// --- the form ----------------------------------------------------------------------------------------

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
    input.setAttribute("aria-describedby", `r-${f.name} e-${f.name}`);
    input.addEventListener(input.tagName === "SELECT" ? "change" : "input", () => edited(f.name));
    return el("div", { class: "field" }, el("label", { for: "f-" + f.name, text: f.name, title }), input,
      list || "", el("div", { class: "range", id: "r-" + f.name, text: hint }),
      el("div", { class: "field-error", id: "e-" + f.name }));
  }));
}

// A value typed after a song was picked makes the row the person's own: no longer that song's.
function edited(name) {
  unmark(name);
  if (picked) {
    picked = null;
    $("song-search").value = "";
    $("search-hint").textContent = SEARCH_HINT;
    $("form-hint").textContent = "Your values: edited by hand.";
  }
  if ($("predicted").classList.contains("none")) return;
  $("stale").hidden = false; // the answer shown is for the values before this edit
}

function readForm() {
  const row = {};
  for (const f of info.features) {
    const text = inputs.get(f.name).value.trim();
    if (text === "") continue; // missing: the model imputes it, or the server says it is required
    // Send what was typed: a value that is not a finite number is the server's to refuse, in one place
    // (Infinity would go out as JSON null, which reads as "not given").
    row[f.name] = f.kind === "number" && Number.isFinite(Number(text)) ? Number(text) : text;
  }
  return row;
}

function clearResult() {
  $("subject").textContent = "";
  $("predicted").textContent = "No prediction yet.";
  $("predicted").className = "predicted none";
  $("stale").hidden = true;
  for (const id of ["truth", "probabilities", "notes"]) $(id).replaceChildren();
}

function unmark(name) {
  const input = inputs.get(name);
  input.classList.remove("invalid");
  input.removeAttribute("aria-invalid");
  $("e-" + name).textContent = "";
}

function clearMarks() { for (const name of inputs.keys()) unmark(name); }

function mark(name, text) {
  const input = inputs.get(name);
  input.classList.add("invalid");
  input.setAttribute("aria-invalid", "true");
  $("e-" + name).textContent = text;
}

// --- a 422 in words ----------------------------------------------------------------------------------

// What is wrong with the value sent for feature f, said to a person; null when the page cannot tell (the
// server's own words are shown then).
function fieldProblem(f, value) {
  const label = capital(f.name);
  if (value === undefined) return `${label} is required: enter a value`;
  if (f.kind !== "number") return null;
  if (typeof value !== "number") return `${label} must be a number, you entered “${shown(String(value))}”`;
  if (f.integer && !Number.isInteger(value)) return `${label} must be a whole number, you entered ${number(value)}`;
  if (f.limits && (value < f.limits[0] || value > f.limits[1])) {
    const unit = f.unit ? ` ${f.unit}` : "";
    return `${label} must be between ${number(f.limits[0])} and ${number(f.limits[1])}${unit}, `
      + `you entered ${number(value)}`;
  }
  return null;
}

// The features a task's own refusal names in quotes ('chorus_hit' ... 'duration_ms'), to mark them.
function quoted(message) {
  return [...message.matchAll(/'([^']+)'/g)].map((m) => m[1]).filter((name) => inputs.has(name));
}

// The API's problems (one per feature or per check, for API clients: "'tempo' = 900 is outside ...") as
// one sentence per problem for a person, each field at fault marked with its own.
function explainProblems(problems, row) {
  const sentences = [];
  for (const p of problems) {
    const own = p.features.filter((name) => byName.has(name)).map((name) => [name, fieldProblem(byName.get(name), row[name])]);
    if (own.length && own.every(([, text]) => text)) {
      for (const [name, text] of own) { mark(name, text); sentences.push(text); }
      continue;
    }
    const text = capital(p.message);
    for (const name of p.features.length ? p.features : quoted(p.message)) if (inputs.has(name)) mark(name, text);
    sentences.push(text);
  }
  return sentences.length === 1 ? `${sentences[0]}.`
    : `${sentences.length} values need fixing. ${sentences.join(". ")}.`;
}

function explain(err, row) {
  const problems = err.body && err.body.problems;
  if (err.status === 422 && problems && problems.length) return explainProblems(problems, row);
  if (err.status === 422) return `The server could not use these values: ${err.message}`;
  return err.message;
}

// --- predicting -------------------------------------------------------------------------------------

async function predict() {
  const seq = ++predictSeq;
  const row = readForm();
  const subject = picked;
  showError("");
  clearMarks();
  $("predict-button").disabled = true;
  try {
    const res = await getJSON("v1/predict", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ rows: [row] }),
    });
    if (seq === predictSeq) showPrediction(res, subject);
  } catch (err) {
    if (seq !== predictSeq) return;
    clearResult(); // an answer shown now would be for other values than those in the form
    showError(explain(err, row));
    const first = [...inputs.values()].find((input) => input.classList.contains("invalid"));
    if (first) first.focus(); // on a phone the field at fault may be a screen away from the message
  } finally {
    if (seq === predictSeq) $("predict-button").disabled = false;
  }
}

function showNotes(p) {
  const notes = [];
  const numbers = p.missing.filter((name) => byName.get(name).kind === "number");
  const categories = p.missing.filter((name) => byName.get(name).kind === "category");
  if (numbers.length) notes.push(`Not given, so the model took the training data's mean: ${numbers.join(", ")}.`);
  if (categories.length) notes.push(`Not given, so the model took none of their values: ${categories.join(", ")}.`);
  for (const [name, value] of Object.entries(p.other)) {
    notes.push(`${name} = “${value}” is not a value the model knows, so it was taken as “other”.`);
  }
  $("notes").replaceChildren(...notes.map((text) => el("li", { text })));
}

// `song` is the song the values were when they were sent (null: a person's own values).
function showPrediction(res, song) {
  const p = res.predictions[0];
  clearResult();
  if (song) $("subject").replaceChildren("For ", el("b", { text: song.title }), ` by ${song.artist}`);
  else $("subject").textContent = "For your values";
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
  if (song) {
    const right = song.era === p.class;
    $("truth").append("In the data set: ", el("b", { text: song.era }), " — ",
      el("span", { class: right ? "right" : "wrong", text: right ? "the model is right" : "the model is wrong" }),
      song.held_out ? " (a held-out song: no worker trained on it)" : " (a training song)");
  }
  showNotes(p);
  showModel(res);
}

function clearAll() {
  searchSeq++; // a search or prediction still on its way is for what was just cleared
  predictSeq++;
  for (const input of inputs.values()) input.value = "";
  clearMarks();
  clearResult();
  picked = null;
  $("form-hint").textContent = formHint();
  $("predict-button").disabled = false;
  showError("");
  if (!info.song_search) return;
  $("song-search").value = "";
  closeResults();
  $("search-hint").textContent = SEARCH_HINT;
}

// --- the song search: an ARIA combobox --------------------------------------------------------------

function options() { return [...$("song-results").children]; }

function closeResults() {
  $("song-results").replaceChildren();
  $("song-search").setAttribute("aria-expanded", "false");
  $("song-search").removeAttribute("aria-activedescendant");
  active = -1;
}

function setActive(i) {
  const all = options();
  if (!all.length) return;
  active = Math.max(0, Math.min(all.length - 1, i));
  all.forEach((li, k) => {
    li.classList.toggle("active", k === active);
    li.setAttribute("aria-selected", String(k === active));
  });
  $("song-search").setAttribute("aria-activedescendant", all[active].id);
  all[active].scrollIntoView({ block: "nearest" });
}

function pick(song) {
  picked = song;
  for (const f of info.features) inputs.get(f.name).value = String(song.features[f.name]);
  clearMarks();
  $("form-hint").replaceChildren(el("b", { text: song.title }), ` by ${song.artist}`);
  closeResults();
  $("search-hint").textContent = `${song.title} by ${song.artist}, ${song.era} in the data set.`;
  $("song-search").value = `${song.title} — ${song.artist}`;
  predict();
}

function showResults(res) {
  $("search-hint").textContent = res.total === 0 ? "No song matches. " + SEARCH_HINT : res.total > res.songs.length
    ? `${res.total} songs match; the first ${res.songs.length} are shown.` : `${res.total} song${res.total > 1 ? "s" : ""} match.`;
  $("song-results").replaceChildren(...res.songs.map((song, i) => {
    const li = el("li", { role: "option", id: `song-${i}`, "aria-selected": "false", dataset: { uri: song.uri } },
      el("span", { class: "title", text: song.title }), el("span", { class: "artist", text: song.artist }),
      el("span", { class: "meta", text: song.era + (song.held_out ? " · held out" : "") }));
    li.addEventListener("click", () => pick(song));
    li.song = song;
    return li;
  }));
  $("song-search").setAttribute("aria-expanded", String(res.songs.length > 0));
  active = -1;
  setActive(0);
}

async function search() {
  const q = $("song-search").value.trim();
  const seq = ++searchSeq;
  if (!q) { closeResults(); $("search-hint").textContent = SEARCH_HINT; return; }
  $("search-panel").classList.add("searching");
  $("song-results").setAttribute("aria-busy", "true");
  $("search-hint").textContent = "Searching…";
  try {
    const res = await getJSON(`v1/songs?q=${encodeURIComponent(q)}&limit=8`);
    if (seq === searchSeq) showResults(res);
  } catch (err) {
    if (seq === searchSeq) { closeResults(); $("search-hint").textContent = ""; showError(err.message); }
  } finally {
    if (seq === searchSeq) {
      $("search-panel").classList.remove("searching");
      $("song-results").removeAttribute("aria-busy");
    }
  }
}

function onSearchKey(e) {
  const open = options().length > 0;
  if (e.key === "ArrowDown" || e.key === "ArrowUp") {
    if (!open) return;
    e.preventDefault(); // the caret stays where it is
    setActive(active + (e.key === "ArrowDown" ? 1 : -1));
  } else if (e.key === "Enter" && open && active >= 0) {
    e.preventDefault();
    pick(options()[active].song);
  } else if (e.key === "Escape" && open) {
    e.preventDefault(); // closes the list only; a second Escape clears the box, as a search box does
    searchSeq++;
    closeResults();
  }
}

function startSearch() {
  $("search-panel").hidden = false;
  let timer = null;
  // Wait for a pause in typing (150 ms) so that a word typed fast is one search, not one per letter.
  $("song-search").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(search, 150);
  });
  $("song-search").addEventListener("keydown", onSearchKey);
}

// Served by `fedfleet serve RUNS/` (under /runs/NAME/), the server names the run list these pages come from
// (v1/links): a link back to it, first in the nav. A coordinator's own pages have none.
async function showRunListLink() {
  let links = null;
  try { links = await getJSON("v1/links"); } catch (_) { return; } // an older server: no link, nothing wrong
  // Only a path on this site: the link never leads elsewhere, whatever the answer says.
  if (!links || typeof links.run_list !== "string" || !links.run_list.startsWith("/") || $("run-list-link")) return;
  $("nav").prepend(el("a", { id: "run-list-link", href: links.run_list, text: "All runs" }));
}

let runListShown = null; // settled once the nav is final (the tests await it)

async function start() {
  showSession($("session"));
  runListShown = showRunListLink();
  try {
    info = await getJSON("v1/predict");
  } catch (err) {
    showError(`This run cannot predict: ${err.message}`);
    $("predict-button").disabled = true;
    $("clear-button").disabled = true;
    return;
  }
  byName = new Map(info.features.map((f) => [f.name, f]));
  showModel(info);
  describePage();
  buildForm();
  if (info.song_search) startSearch();
  $("features").addEventListener("submit", (e) => { e.preventDefault(); predict(); });
  $("clear-button").addEventListener("click", clearAll);
}

start();
