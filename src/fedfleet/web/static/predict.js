// The prediction page: search the data set (v1/songs), fill the features, ask v1/predict.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;        // v1/predict: eras and features with their ranges
let picked = null;      // the song chosen from the data set, while its features are unchanged
let searchSeq = 0;      // answers to an older search are dropped when a newer one was sent

function showError(text) { $("error").textContent = text || ""; }

function buildForm() {
  $("fields").replaceChildren(...info.features.map((f) => {
    const unit = f.unit ? ` ${f.unit}` : "";
    return el("div", { class: "field" },
      el("label", { for: "f-" + f.name, text: f.name, title: f.description }),
      el("input", { id: "f-" + f.name, name: f.name, type: "text", inputmode: "decimal", required: "",
                    title: f.description, placeholder: f.integer ? "whole number" : "number" }),
      el("div", { class: "range", text: `${f.minimum.toLocaleString("en")} to ${f.maximum.toLocaleString("en")}${unit}` }));
  }));
  for (const input of $("fields").querySelectorAll("input")) {
    input.addEventListener("input", () => {
      input.classList.remove("invalid");
      if (picked) { picked = null; $("song-picked").textContent = "Features edited by hand."; }
    });
  }
}

function readForm() {
  const song = {};
  for (const f of info.features) {
    const text = $("f-" + f.name).value.trim();
    // Send what was typed: an empty or non-numeric field is the server's to explain, in one place.
    song[f.name] = text === "" ? null : (isNaN(Number(text)) ? text : Number(text));
  }
  for (const k of Object.keys(song)) if (song[k] === null) delete song[k];
  return song;
}

async function predict() {
  showError("");
  for (const input of $("fields").querySelectorAll("input")) input.classList.remove("invalid");
  $("predict-button").disabled = true;
  try {
    const res = await getJSON("v1/predict", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ songs: [readForm()] }),
    });
    showPrediction(res);
  } catch (err) {
    showError(err.message);
    // Mark the fields the message names, e.g. "song 0: 'tempo' = 900 is outside …".
    for (const f of info.features) if (err.message.includes(`'${f.name}'`)) $("f-" + f.name).classList.add("invalid");
  } finally {
    $("predict-button").disabled = false;
  }
}

function showPrediction(res) {
  const p = res.predictions[0];
  $("era").textContent = p.era;
  $("era").className = "era";
  $("truth").replaceChildren();
  if (picked) {
    const right = picked.era === p.era;
    $("truth").append("In the data set: ", el("b", { text: picked.era }), " — ",
      el("span", { class: right ? "right" : "wrong", text: right ? "the model is right" : "the model is wrong" }),
      picked.held_out ? " (a held-out song: no worker trained on it)" : " (a training song)");
  }
  const top = Math.max(...Object.values(p.probabilities));
  $("probabilities").replaceChildren(...res.classes.map((era) => {
    const v = p.probabilities[era];
    return el("div", { class: "prob" + (v === top ? " best" : ""), dataset: { era } },
      el("span", { text: era }),
      el("div", { class: "bar" }, el("div", { style: `width: ${(100 * v).toFixed(1)}%` })),
      el("span", { class: "pct", text: (100 * v).toFixed(1) + "%" }));
  }));
  $("model-info").textContent = modelText(res);
}

function modelText(m) {
  return m.round === 0 ? `The model has not been trained yet (version ${m.model_version}).`
    : `Global model after round ${m.round} (version ${m.model_version}).`;
}

function pick(song) {
  picked = song;
  for (const f of info.features) {
    $("f-" + f.name).value = String(song.features[f.name]);
    $("f-" + f.name).classList.remove("invalid");
  }
  $("song-picked").replaceChildren(el("b", { text: song.title }), ` by ${song.artist}`);
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

async function start() {
  try {
    info = await getJSON("v1/predict");
  } catch (err) {
    showError(err.message);
    $("song-search").disabled = true;
    $("predict-button").disabled = true;
    return;
  }
  $("model-badge").textContent = info.round === 0 ? "model: untrained" : `model: round ${info.round}`;
  $("model-info").textContent = modelText(info);
  buildForm();
  let timer = null;
  // Wait for a pause in typing (150 ms) so that a word typed fast is one search, not one per letter.
  $("song-search").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(search, 150); });
  $("song-search").addEventListener("keydown", (e) => {
    const first = $("song-results").querySelector("li.active") || $("song-results").firstElementChild;
    if (e.key === "Enter" && first) { e.preventDefault(); pick(first.song); }
  });
  $("features").addEventListener("submit", (e) => { e.preventDefault(); predict(); });
  $("clear-button").addEventListener("click", () => {
    for (const input of $("fields").querySelectorAll("input")) { input.value = ""; input.classList.remove("invalid"); }
    picked = null;
    $("song-picked").textContent = "Pick a song above, or enter values by hand.";
    showError("");
  });
}

start();
