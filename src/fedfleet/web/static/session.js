// Who is signed in: showSession(container) fills a page header's <div id="session" class="session"> with
// "signed in · Sign out" when the server asks for an admin token (GET /v1/session), and leaves it empty
// when it does not (an open coordinator or `fedfleet serve`).
//
// Its URLs are absolute, unlike the pages' own: signing in is the site's (the cookie's Path is /, the
// sign-in page is /login), not a run's, and `fedfleet serve runs/` serves a run's pages under /runs/NAME/.
"use strict";

(function loadSessionStyle() {
  // The styles travel with the script, so each page including it needs one line, not two.
  if (document.querySelector('link[href$="static/session.css"]')) return;
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = "/static/session.css";
  document.head.append(link);
})();

async function showSession(container) {
  if (!container) return;
  let session = null;
  try {
    const res = await fetch("/v1/session", { headers: { Accept: "application/json" } });
    if (res.ok) session = await res.json();
  } catch (_) { /* no answer: say nothing rather than something wrong */ }
  if (!session || !session.auth) { container.replaceChildren(); return; }
  if (!session.signed_in) {
    const back = "/login?next=" + encodeURIComponent(location.pathname + location.search);
    container.replaceChildren(document.createTextNode("not signed in · "), sessionLink(back, "Sign in"));
    return;
  }
  // Sign-out is a POST (a link would let any page that embeds it sign you out), so a one-button form.
  const form = document.createElement("form");
  form.method = "post";
  form.action = "/logout";
  const button = document.createElement("button");
  button.type = "submit";
  button.id = "sign-out";
  button.textContent = "Sign out";
  form.append(button);
  container.replaceChildren(document.createTextNode("signed in · "), form);
}

function sessionLink(href, text) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  return a;
}
