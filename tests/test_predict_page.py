"""The predict page as a person uses it, in Debian's Chromium driven by Playwright: picking a song with the
mouse or the keyboard, typing values by hand, Clear, mistakes said in words, the search while it works,
and a live run whose model moves on between two answers. Real `fedfleet serve` and coordinator processes.
"""

# The fixtures imported from test_web_browser are taken as parameters by name, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.numpy

from fedfleet.tasks.songs import ERAS, FEATURES, SongsTask, load_songs
from test_predict_tabular import planned_task
from test_web import TIMEOUT
from test_web_browser import (  # noqa: F401  (fixtures, used by name)
    browser,
    page,
    pick_song,
    screenshot,
    served_run,
    served_tabular,
)

SEARCH_HINT = "Every word must appear in the title or the artist."


def open_page(page: Any, url: str) -> None:
    page.goto(url + "/predict")
    page.wait_for_selector("#fields .field")


def search(page: Any, query: str) -> None:
    """Type ``query`` as a person would and wait for its answer to be listed."""
    page.locator("#song-search").press_sequentially(query, delay=30)
    page.wait_for_function("document.getElementById('song-search').getAttribute('aria-expanded') === 'true'")


def field_errors(page: Any) -> dict[str, str]:
    """Each marked field and the words under it."""
    marked = page.locator("#fields input.invalid, #fields select.invalid").all()
    return {str(m.get_attribute("name")): str(page.text_content(f"#e-{m.get_attribute('name')}")) for m in marked}


def test_a_song_picked_with_the_keyboard_gets_the_models_era(page: Any, served_run: tuple[str, Path],
                                                             tmp_path: Path) -> None:
    url, run_dir = served_run
    open_page(page, url)
    box = page.locator("#song-search")
    assert box.get_attribute("role") == "combobox" and box.get_attribute("aria-expanded") == "false"
    search(page, "yesterday")
    options = page.locator("#song-results [role=option]")
    titles = [f"{o.locator('.title').text_content()} / {o.locator('.artist').text_content()}" for o in options.all()]
    target = titles.index("Yesterday / The Beatles")
    assert target >= 1  # so that the arrows have somewhere to go
    # Down to the Beatles' and back up one and down again: the highlighted option is the one Enter picks.
    for key in ["ArrowDown"] * target + ["ArrowUp", "ArrowDown"]:
        box.press(key)
    active = page.locator("#song-results [aria-selected=true]")
    assert active.count() == 1 and box.get_attribute("aria-activedescendant") == active.get_attribute("id")
    assert active.locator(".artist").text_content() == "The Beatles"
    box.press("Enter")
    page.wait_for_function("document.querySelectorAll('#probabilities .prob').length === 3")
    assert box.get_attribute("aria-expanded") == "false" and options.count() == 0

    era = page.text_content("#predicted")
    songs = load_songs()
    i = next(k for k in range(len(songs.uri)) if (songs.track[k], songs.artist[k]) == ("Yesterday", "The Beatles"))
    proba = SongsTask().predict_proba(safetensors.numpy.load_file(run_dir / "model.safetensors"), songs.x[i:i + 1])[0]
    assert era == ERAS[int(proba.argmax())]
    shown = {row.get_attribute("data-class"): float(row.locator(".pct").text_content().rstrip("%"))
             for row in page.locator("#probabilities .prob").all()}
    assert list(shown) == list(ERAS)
    for e, p in zip(ERAS, proba, strict=True):
        assert abs(shown[e] - 100 * p) <= 0.051  # shown to one decimal
    for name, value in zip(FEATURES, songs.x[i], strict=True):
        assert float(page.input_value(f"#f-{name}")) == value
    assert page.text_content("#subject") == "For Yesterday by The Beatles"
    assert "In the data set: 1960s-70s" in page.text_content("#truth")
    assert "after round 3" in page.text_content("#model-info") and page.text_content("#model-badge") == "model: round 3"
    screenshot(page, tmp_path, "predict.png")

    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    # One column: the answer comes before the form, so that a phone shows it without scrolling past 15 fields.
    result, form = (page.locator(sel).bounding_box() for sel in ("#result", "#features"))
    assert result is not None and form is not None and result["y"] < form["y"]
    screenshot(page, tmp_path, "predict-phone.png")


def test_escape_closes_the_list_and_the_placeholders_examples_find_songs(page: Any,
                                                                         served_run: tuple[str, Path]) -> None:
    url, _ = served_run
    open_page(page, url)
    examples = re.findall(r"“([^”]+)”", page.get_attribute("#song-search", "placeholder"))
    assert len(examples) == 2
    for example in examples:
        found = httpx.get(f"{url}/v1/songs", params={"q": example}, timeout=TIMEOUT).json()
        assert found["total"] >= 1, example
    search(page, examples[1])
    assert "Prince" in page.text_content("#song-results li")
    page.locator("#song-search").press("Escape")
    assert page.locator("#song-results li").count() == 0
    assert page.get_attribute("#song-search", "aria-expanded") == "false"
    assert page.input_value("#song-search") == examples[1]  # Escape closes the list, it keeps what was typed


def test_editing_a_picked_songs_value_makes_the_values_your_own(page: Any,
                                                                served_run: tuple[str, Path]) -> None:
    url, _ = served_run
    pick_song(page, url, "yesterday beat", "Yesterday", "The Beatles")
    page.fill("#f-tempo", "150")
    # Nothing says the song any more: the search box, its hint and the form's line are the person's.
    assert page.input_value("#song-search") == "" and page.text_content("#search-hint") == SEARCH_HINT
    assert page.text_content("#form-hint") == "Your values: edited by hand."
    # The answer on the page is the song's, and says so, and that the values changed since.
    assert page.text_content("#subject") == "For Yesterday by The Beatles" and page.is_visible("#stale")
    page.click("#predict-button")
    page.wait_for_function("document.getElementById('subject').textContent === 'For your values'")
    assert page.text_content("#truth") == "" and not page.is_visible("#stale")
    assert page.locator("#probabilities .prob").count() == 3


def test_clear_clears_everything(page: Any, served_run: tuple[str, Path]) -> None:
    url, _ = served_run
    pick_song(page, url, "billie jean", "Billie Jean", "Michael Jackson")
    page.fill("#f-danceability", "3")
    page.click("#predict-button")
    page.wait_for_selector("#error:not(:empty)")
    search(page, "love")  # a list open too
    page.click("#clear-button")
    assert page.input_value("#song-search") == "" and page.text_content("#search-hint") == SEARCH_HINT
    assert page.locator("#song-results li").count() == 0
    assert page.text_content("#error") == "" and field_errors(page) == {}
    assert page.text_content("#predicted") == "No prediction yet." and page.text_content("#subject") == ""
    assert page.locator("#probabilities .prob").count() == 0 and page.text_content("#truth") == ""
    assert page.text_content("#form-hint") == "Pick a song above, or enter values by hand."
    assert all(page.input_value(f"#f-{name}") == "" for name in FEATURES)


def test_a_mistake_is_said_in_words_by_its_field_and_the_old_answer_goes(page: Any,
                                                                         served_run: tuple[str, Path]) -> None:
    url, _ = served_run
    pick_song(page, url, "billie jean", "Billie Jean", "Michael Jackson")
    page.fill("#f-tempo", "900")
    page.click("#predict-button")
    page.wait_for_selector("#error:not(:empty)")
    # In words for a person, not the API's "row 0: 'tempo' = 900 is outside its plausible range [0, 300]".
    said = "Tempo must be between 0 and 300 BPM, you entered 900"
    assert page.text_content("#error") == said + "."
    assert field_errors(page) == {"tempo": said}
    assert page.get_attribute("#f-tempo", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "f-tempo"
    # The answer for the song's own values is gone: it would not be the answer for these.
    assert page.text_content("#predicted") == "No prediction yet." and page.text_content("#subject") == ""
    assert page.locator("#probabilities .prob").count() == 0 and page.text_content("#truth") == ""

    page.fill("#f-tempo", "")
    page.fill("#f-danceability", "3")
    page.fill("#f-key", "2.5")
    page.click("#predict-button")
    page.wait_for_function("document.getElementById('error').textContent.startsWith('3 values')")
    assert page.text_content("#error") == ("3 values need fixing. Danceability must be between 0 and 1, you entered 3. "
                                           "Key must be a whole number, you entered 2.5. Tempo is required: enter a "
                                           "value.")
    assert set(field_errors(page)) == {"danceability", "key", "tempo"}

    # The task's own check, about two fields at once: the server's words, both fields marked.
    page.click("#clear-button")
    pick_song(page, url, "billie jean", "Billie Jean", "Michael Jackson")
    page.fill("#f-duration_ms", "20000")
    page.fill("#f-chorus_hit", "400")
    page.click("#predict-button")
    page.wait_for_selector("#error:not(:empty)")
    assert "is after the end of the song" in page.text_content("#error")
    assert set(field_errors(page)) == {"chorus_hit", "duration_ms"}


def test_searching_shows_and_an_earlier_words_answer_never_overwrites_a_later_one(
        page: Any, served_run: tuple[str, Path]) -> None:
    url, _ = served_run
    # Counts the search answers the page has read: the page's own handling of one runs in the microtasks
    # right after, before the next check of wait_for_function.
    page.add_init_script("""
      window.songAnswers = 0;
      const realFetch = window.fetch;
      window.fetch = async (...args) => {
        const res = await realFetch(...args);
        if (String(args[0]).includes("v1/songs")) {
          const read = res.json.bind(res);
          res.json = () => read().finally(() => { window.songAnswers += 1; });
        }
        return res;
      };""")
    open_page(page, url)
    held: list[Any] = []
    # The answer to "love" is held back until the answer to "yesterday" is on the page: as when the first
    # search of a coordinator takes seconds and the person has typed on.
    page.route(re.compile(r".*/v1/songs\?q=love&.*"), lambda route: held.append(route))
    page.fill("#song-search", "love")
    page.wait_for_function("document.getElementById('search-hint').textContent === 'Searching…'")
    assert page.get_attribute("#song-results", "aria-busy") == "true"
    assert "searching" in str(page.get_attribute("#search-panel", "class"))
    assert len(held) == 1
    page.fill("#song-search", "yesterday")
    page.wait_for_function("document.getElementById('song-search').getAttribute('aria-expanded') === 'true'")
    later = page.locator("#song-results .title").all_text_contents()
    assert later and all("yesterday" in t.lower() for t in later)
    assert page.evaluate("window.songAnswers") == 1
    held[0].continue_()
    page.wait_for_function("window.songAnswers === 2")  # the answer to "love" came, and was read
    assert page.locator("#song-results .title").all_text_contents() == later
    assert "searching" not in str(page.get_attribute("#search-panel", "class"))
    assert page.get_attribute("#song-results", "aria-busy") is None


def test_a_tabular_plans_form_and_its_mistakes(page: Any, served_tabular: tuple[str, Path],
                                               tmp_path: Path) -> None:
    url, run_dir = served_tabular
    plan = json.loads((run_dir / "plan.json").read_text())
    open_page(page, url)
    assert page.text_content("h1") == "Predict churned"
    assert not page.is_visible("#search-panel")  # no song search: the tabular task offers none
    for f in plan["features"]:
        if f["kind"] == "number":
            assert page.get_attribute(f"#f-{f['name']}", "placeholder") == page.evaluate("number", f["mean"])
            assert page.text_content(f"#r-{f['name']}").startswith(page.evaluate("number", f["min"]))
        else:
            options = page.locator(f"#f-{f['name']} option").all_text_contents()
            assert options == ["— not given —", *f["values"]]

    page.fill("#f-age", "35")
    page.select_option("#f-city", "Oslo")
    page.select_option("#f-plan", "pro")
    page.click("#predict-button")
    page.wait_for_function("document.querySelectorAll('#probabilities .prob').length === 2")
    weights = safetensors.numpy.load_file(run_dir / "model.safetensors")
    want = planned_task(run_dir).predict_rows(weights, [{"age": 35, "city": "Oslo", "plan": "pro"}])[0]
    assert page.text_content("#predicted") == plan["classes"][int(want.argmax())]
    assert page.text_content("#subject") == "For your values"
    shown = [float(pct.rstrip("%")) for pct in page.locator("#probabilities .pct").all_text_contents()]
    assert shown == pytest.approx([100 * p for p in want], abs=0.051)
    assert "took the training data's mean: income" in page.text_content("#notes")
    screenshot(page, tmp_path, "predict-tabular.png")

    for typed in ("forty", "Infinity"):  # Infinity would travel as JSON null, read as "not given"
        page.fill("#f-age", typed)
        page.click("#predict-button")
        page.wait_for_function(f"document.getElementById('error').textContent.includes('{typed}')")
        assert page.text_content("#error") == f"Age must be a number, you entered “{typed}”."
        assert field_errors(page) == {"age": f"Age must be a number, you entered “{typed}”"}
        assert page.text_content("#predicted") == "No prediction yet."


@pytest.mark.parametrize("width", [360, 390, 768, 1280, 1920])
def test_the_predict_page_is_never_wider_than_the_screen(browser: Any, served_run: tuple[str, Path],
                                                         served_tabular: tuple[str, Path], width: int) -> None:
    context = browser.new_context(viewport={"width": width, "height": 800})
    try:
        pg = context.new_page()
        open_page(pg, served_run[0])
        # The longest unbroken words of the data set, listed, then picked; then a mistake's message.
        search(pg, "Southernplayalisticadillacmuzik")
        assert pg.evaluate("document.documentElement.scrollWidth") <= width
        row = pg.locator("#song-results li").first
        box, meta = row.bounding_box(), row.locator(".meta").bounding_box()
        assert box is not None and meta is not None and meta["x"] + meta["width"] <= box["x"] + box["width"]
        row.click()
        pg.wait_for_selector("#probabilities .prob")
        assert pg.evaluate("document.documentElement.scrollWidth") <= width
        pg.fill("#f-chorus_hit", "1" * 30)
        pg.click("#predict-button")
        pg.wait_for_selector("#error:not(:empty)")
        assert pg.evaluate("document.documentElement.scrollWidth") <= width
        open_page(pg, served_tabular[0])
        pg.click("#predict-button")
        pg.wait_for_selector("#error:not(:empty), #probabilities .prob")
        assert pg.evaluate("document.documentElement.scrollWidth") <= width
    finally:
        context.close()


def answered_round(page: Any) -> int:
    """The round of the model the page's last answer came from (0: not trained yet)."""
    text = str(page.text_content("#model-info"))
    found = re.search(r"after round (\d+) ", text)
    assert found is not None or "not been trained" in text, text
    return int(found.group(1)) if found else 0


def test_the_header_follows_the_model_each_answer_came_from(page: Any, coordinator: Any, worker: Any) -> None:
    coord = coordinator("--workers", "1", "--rounds", "5000")  # still going when the test ends
    worker(coord.url)
    pick_song(page, coord.url, "yesterday beat", "Yesterday", "The Beatles")
    first, said = answered_round(page), page.text_content("#model-info")
    assert page.text_content("#model-badge") == (f"model: round {first}" if first else "model: untrained")
    # The run goes on; the page's next answer comes from a later model, and the header says which.
    deadline = time.monotonic() + 60
    while httpx.get(coord.url + "/v1/status", timeout=TIMEOUT).json()["round"] <= first + 1:
        assert time.monotonic() < deadline, "the run did not move on within a minute"
        time.sleep(0.1)
    page.click("#predict-button")
    page.wait_for_function("said => document.getElementById('model-info').textContent !== said", arg=said)
    later = answered_round(page)
    assert later > first and page.text_content("#model-badge") == f"model: round {later}"
