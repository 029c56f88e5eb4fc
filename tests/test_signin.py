"""Signing in to a coordinator that has an admin token, as a person does in Chromium, and as API clients do.

A browser that opens a page without the token gets a sign-in page in the pages' look that brings it back
to the page it asked for; a wrong token says so and keeps the form; the header says "signed in" and signs
out. Programs (Accept: application/json, bearer tokens) keep their JSON 401s. A real coordinator process
started with --admin-token-file, on 127.0.0.1.
"""

# The fixtures imported from test_web_browser are taken as parameters by name, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Coordinator, Fleet
from fedfleet.coordinator.security import COOKIE, safe_next, scope_of
from test_auth import ADMIN, bearer, write_token
from test_web_browser import WAIT_MS, browser, page, screenshot  # noqa: F401  (fixtures, used by name)

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def secured(module_fleet: Fleet) -> Iterator[Coordinator]:
    """A songs coordinator with an admin token and no workers: it waits, and serves its pages meanwhile."""
    token = write_token(module_fleet.directory / "admin.token", ADMIN)
    yield module_fleet.coordinator("--workers", "2", "--rounds", "2", "--admin-token-file", str(token))


@pytest.fixture(scope="module")
def http(secured: Coordinator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=secured.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
def signin_page(browser: Any) -> Iterator[Any]:
    """test_web_browser's ``page``, but for a coordinator that answers 401: the sign-in page comes with that
    status (it is the API's answer too), which Chromium logs; any other error fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    pg.set_default_timeout(WAIT_MS)
    try:
        yield pg
        assert [e for e in errors if "status of 401 (Unauthorized)" not in e] == [], errors
    finally:
        context.close()


def session_text(pg: Any) -> str:
    pg.wait_for_selector("#session:not(:empty)")
    return " ".join(str(pg.text_content("#session")).split())


# --- pure parts ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("asked", "goes_to"), [
    ("/predict", "/predict"), ("/", "/"), ("/v1/status?x=1", "/v1/status?x=1"), ("", "/"),
    ("https://evil.example/", "/"), ("//evil.example/x", "/"), ("/\\evil.example", "/"), ("\\\\evil.example", "/"),
    ("/\t/evil.example", "/"), ("javascript:alert(1)", "/"), ("predict", "/"), ("/login", "/"),
    ("/logout?next=/", "/"), ("/" + "a" * 3000, "/"),
])
def test_only_a_path_of_this_site_is_a_place_to_go_back_to(asked: str, goes_to: str) -> None:
    assert safe_next(asked) == goes_to


def test_the_pages_assets_are_public_and_nothing_beside_them() -> None:
    for path in ("/static/style.css", "/static/session.js", "/v1/session", "/login", "/logout"):
        assert scope_of("GET", path) == "public", path
    for method, path in (("GET", "/static/"), ("GET", "/static/a/../../v1/status"), ("POST", "/static/style.css"),
                         ("GET", "/static\\..\\v1")):
        assert scope_of(method, path) == "admin", (method, path)


# --- programs -----------------------------------------------------------------------------------
def test_api_clients_keep_their_json_answers(http: httpx.Client) -> None:
    for accept in ("application/json", "*/*"):
        r = http.get("/", headers={"Accept": accept})
        assert r.status_code == 401 and r.headers["content-type"] == "application/json", accept
        assert "admin token" in r.json()["detail"] and r.headers["www-authenticate"].startswith("Bearer")
    assert http.get("/predict", headers=bearer(ADMIN)).status_code == 200
    # The stylesheet the sign-in page wears is readable by anyone; the run's data is not.
    assert http.get("/static/style.css").status_code == 200
    assert http.get("/v1/predict").status_code == 401


def test_the_session_says_whether_a_token_is_needed_and_held(http: httpx.Client) -> None:
    assert http.get("/v1/session").json() == {"auth": True, "signed_in": False}
    assert http.get("/v1/session", headers=bearer(ADMIN)).json() == {"auth": True, "signed_in": True}
    assert http.get("/v1/session", headers=bearer(ADMIN + "x")).json() == {"auth": True, "signed_in": False}
    cookie = {"Cookie": f"{COOKIE}={ADMIN}"}
    assert http.get("/v1/session", headers=cookie).json() == {"auth": True, "signed_in": True}


def test_sign_in_goes_back_to_the_page_asked_for_and_never_to_another_site(secured: Coordinator) -> None:
    # Module-level calls, not a Client: each request without the cookie the one before it got.
    r = httpx.post(secured.url + "/login", data={"token": ADMIN, "next": "/predict?x=1"}, timeout=TIMEOUT)
    assert r.status_code == 303 and r.headers["location"] == "/predict?x=1"
    for elsewhere in ("https://evil.example/", "//evil.example", "/\\evil.example"):
        r = httpx.post(secured.url + "/login", data={"token": ADMIN, "next": elsewhere}, timeout=TIMEOUT)
        assert r.status_code == 303 and r.headers["location"] == "/", elsewhere
    # The form echoes what it was asked to go back to, escaped.
    r = httpx.get(secured.url + '/login?next=/predict"><script>alert(1)</script>', headers={"Accept": "text/html"},
                  timeout=TIMEOUT)
    assert r.status_code == 200 and "<script>alert" not in r.text and "&lt;script&gt;" in r.text


def test_sign_out_clears_the_cookie_with_the_flags_it_was_set_with(http: httpx.Client) -> None:
    r = http.post("/logout")
    assert r.status_code == 303 and r.headers["location"] == "/login"
    cleared = r.headers["set-cookie"]
    assert cleared.startswith(f"{COOKIE}=;") and "Max-Age=0" in cleared
    assert all(flag in cleared for flag in ("HttpOnly", "SameSite=Strict", "Path=/"))
    assert http.get("/logout").status_code == 405
    r = http.post("/logout", headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "another site" in r.json()["detail"]


# --- a person in Chromium -----------------------------------------------------------------------
def test_a_browser_signs_in_lands_on_the_page_it_asked_for_and_signs_out(
        signin_page: Any, secured: Coordinator, tmp_path: Path) -> None:
    pg = signin_page
    pg.goto(secured.url + "/predict")
    # The sign-in page, in the pages' look (style.css: the dark header), saying why, not the API's JSON.
    assert pg.text_content("h1") == "Sign in"
    assert pg.text_content("#signin-message") == ("This coordinator is protected by an admin token. Sign in to "
                                                    "see the predict page.")
    assert pg.get_attribute("#signin-message", "class") == "signin-msg"  # being asked is no error
    assert pg.evaluate("getComputedStyle(document.querySelector('header.top')).backgroundColor") == "rgb(17, 24, 39)"
    assert pg.evaluate("document.documentElement.scrollWidth") <= 1280
    screenshot(pg, tmp_path, "signin.png")

    # A wrong token says so, and the form stays (still going back to /predict).
    pg.set_viewport_size({"width": 390, "height": 844})
    pg.fill("#token", ADMIN + "-wrong")
    pg.click("button[type=submit]")
    pg.wait_for_selector("#signin-message.error")
    assert "not the admin token of this coordinator" in pg.text_content("#signin-message")
    assert pg.is_visible("#token") and pg.input_value("input[name=next]") == "/predict"
    assert pg.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(pg, tmp_path, "signin-phone.png")

    pg.set_viewport_size({"width": 1280, "height": 900})
    pg.fill("#token", ADMIN)
    pg.click("button[type=submit]")
    pg.wait_for_selector("#fields .field")  # the predict page, with its form built from the API
    assert pg.url == secured.url + "/predict"
    assert session_text(pg) == "signed in · Sign out"
    # The token is in a cookie no script can read.
    cookie = next(c for c in pg.context.cookies() if c["name"] == COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] == ADMIN
    assert COOKIE not in pg.evaluate("document.cookie")

    pg.click("#sign-out")
    pg.wait_for_selector("#signin-message")
    assert pg.url == secured.url + "/login"
    assert all(c["name"] != COOKIE for c in pg.context.cookies())
    pg.goto(secured.url + "/")
    assert pg.text_content("#signin-message") == ("This coordinator is protected by an admin token. Sign in to "
                                                    "see the dashboard.")


def test_a_browser_whose_token_is_no_longer_valid_is_told_so(signin_page: Any, secured: Coordinator) -> None:
    pg = signin_page
    pg.context.add_cookies([{"name": COOKIE, "value": "an-old-admin-token-0123456789", "url": secured.url}])
    pg.goto(secured.url + "/")
    assert "no longer valid" in pg.text_content("#signin-message")
    assert pg.get_attribute("#signin-message", "class") == "signin-msg error"
    assert pg.input_value("input[name=next]") == "/"


def test_an_open_server_shows_no_sign_in(page: Any, fleet: Fleet) -> None:
    coord = fleet.coordinator("--workers", "2", "--rounds", "2")
    assert httpx.get(coord.url + "/v1/session", timeout=TIMEOUT).json() == {"auth": False, "signed_in": False}
    page.goto(coord.url + "/predict")
    page.wait_for_selector("#fields .field")
    page.wait_for_load_state("networkidle")  # /v1/session answered, and showSession done with it
    assert page.text_content("#session") == ""
    # Nothing to sign in to: /login goes on to the page asked for.
    page.goto(coord.url + "/login?next=/predict")
    assert page.url == coord.url + "/predict"
