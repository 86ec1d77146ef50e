"""The web page in a real headless Chromium (Debian's package, driven by Playwright; no browser download),
against the real gateway, router and shard servers. Screenshots go to test-artifacts/browser/."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import encode

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@contextmanager
def opened(url: str):
    """(page, the page's script errors) of url in a headless Chromium, closed after."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "browser tests need Debian's chromium (apt-get install chromium)"
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        try:
            yield page, errors
        finally:
            browser.close()


@pytest.fixture()
def browser_page(catalogue, served):
    stack = served()
    with opened(stack.gateway.url) as (page, errors):
        yield page, catalogue, [g[0] for g in stack.shards], errors


def hit_ids(page) -> list[str]:
    return page.locator(".hit").evaluate_all("cards => cards.map(c => c.dataset.id)")


def thumbnails_loaded(page) -> bool:
    return page.locator(".hit img").evaluate_all("imgs => imgs.every(i => i.complete && i.naturalWidth > 0)")


def test_upload_click_feedback_and_partial_answer(browser_page, tmp_path):
    page, tmp, shards, errors = browser_page
    page.wait_for_selector("#index-info:has-text('12 images')")
    target = sorted((tmp / "photos").iterdir())[2]
    query = tmp_path / "query.jpg"
    query.write_bytes(encode(Image.open(target).resize((180, 140)), "JPEG", quality=60))

    # upload an image: the grid fills with thumbnails, scores and ids, the answer's facts above it
    page.locator("#k").fill("8")
    page.set_input_files("#file", str(query))
    page.wait_for_selector(".hit >> nth=7")
    page.wait_for_function("() => [...document.querySelectorAll('.hit img')].every(i => i.complete)")
    assert thumbnails_loaded(page)
    assert page.locator(".hit img").first.get_attribute("alt") == str(target)
    status = page.locator("#status").inner_text()
    assert "8 results" in status and "coverage 100%" in status and " ms" in status and "index v" in status
    assert page.locator("#partial").is_hidden()
    page.screenshot(path=str(SHOTS / "01-upload-results.png"), full_page=True)

    # click a hit: search by it; it comes back first
    second = hit_ids(page)[1]
    page.locator(".hit img").nth(1).click()
    page.wait_for_function(f"() => document.querySelector('.hit')?.dataset.id === '{second}'")
    page.screenshot(path=str(SHOTS / "02-clicked-hit.png"), full_page=True)

    # mark the last hit relevant and the second not relevant, re-run: the marked hit moves up
    before = hit_ids(page)
    liked, disliked = before[-1], before[1]
    page.locator(f".hit[data-id='{liked}'] .mark-yes").click()
    page.locator(f".hit[data-id='{disliked}'] .mark-no").click()
    assert page.locator(".hit.relevant").count() == 1 and page.locator(".hit.not-relevant").count() == 1
    page.locator("#rerun").click()
    page.wait_for_selector("#status:has-text('with feedback')")
    after = hit_ids(page)
    assert liked in after and after.index(liked) < before.index(liked)
    assert page.locator(f".hit[data-id='{liked}']").get_attribute("class").split() == ["hit", "relevant"]
    page.screenshot(path=str(SHOTS / "03-feedback.png"), full_page=True)

    # a shard stops: the next answer is flagged as partial
    shards[1].kill()
    page.locator("#uri").fill(str(target))
    page.locator("#by-uri button").click()
    page.wait_for_selector("#partial:has-text('Partial answer')")
    assert "coverage 50%" in page.locator("#status").inner_text()
    page.wait_for_function("() => document.querySelector('#query-img').naturalWidth > 0")  # the catalogue image
    page.screenshot(path=str(SHOTS / "04-partial.png"), full_page=True)

    # an error is shown, not swallowed
    page.locator("#uri").fill("/not/in/the/catalogue.jpg")
    page.locator("#by-uri button").click()
    page.wait_for_selector("#error:has-text('404')")
    assert not errors, errors


BROKEN_IMAGES = ("() => [...document.images].filter(i => i.offsetParent !== null"
                 " && !(i.complete && i.naturalWidth > 0)).length")


def test_the_page_before_the_first_search_and_after_a_failed_one(browser_page):
    page, tmp, _, errors = browser_page
    page.wait_for_selector("#index-info:has-text('12 images')")
    # Before the first search: the search controls and nothing else (no empty query frame, no feedback bar).
    assert page.locator("#query-row").is_hidden() and page.locator("#feedback-bar").is_hidden()
    assert page.locator("#error").is_hidden() and page.locator("#partial").is_hidden()
    assert page.locator(".hit").count() == 0 and page.evaluate(BROKEN_IMAGES) == 0
    page.screenshot(path=str(SHOTS / "05-before-first-search.png"), full_page=True)

    target = sorted((tmp / "photos").iterdir())[1]
    page.locator("#uri").fill(str(target))
    page.locator("#by-uri button").click()
    page.wait_for_selector(".hit >> nth=5")
    page.locator("#uri").fill("/not/in/the/catalogue.jpg")
    page.locator("#by-uri button").click()
    page.wait_for_selector("#error:has-text('404')")
    # The error replaces the answer: no results of the earlier query below it, no broken query image.
    assert page.locator(".hit").count() == 0 and page.locator("#query-row").is_hidden()
    assert page.evaluate(BROKEN_IMAGES) == 0
    page.screenshot(path=str(SHOTS / "06-after-a-failed-search.png"), full_page=True)
    assert not errors, errors


def test_the_page_picks_a_collection_and_filters(catalogue, start_stack, tmp_path):
    """Two collections behind the gateway: the page offers a picker, and the one picked answers, thumbnails
    included; a filter typed in the page reaches the search (a bad one is shown as the error)."""
    from services.common.config import Settings
    from services.embedder.pipeline import embed_catalogue
    from services.indexer.build import build_index
    from tests.helpers import write_photos

    write_photos(tmp_path / "photos-b", 4)
    settings = Settings(home=catalogue / "home")
    embed_catalogue(str(tmp_path / "photos-b"), str(tmp_path / "emb-b"), engine="local", settings=settings)
    build_index(str(tmp_path / "emb-b"), str(tmp_path / "idx-b"), shards=1, settings=settings)
    stack = start_stack(catalogue / "idx", gateway=True, env={"IMSEARCH_HOME": str(catalogue / "home")},
                        collections={"photos": str(catalogue / "idx"), "more": str(tmp_path / "idx-b")})
    with opened(stack.gateway.url) as (page, errors):
        page.wait_for_selector("#collection-label:visible")
        assert page.locator("#collection option").all_inner_texts() == ["photos", "more"]
        page.wait_for_selector("#index-info:has-text('12 images')")
        page.select_option("#collection", "more")
        page.wait_for_selector("#index-info:has-text('collection more')")
        assert "4 images" in page.locator("#index-info").inner_text()
        target = sorted((tmp_path / "photos-b").iterdir())[1]
        page.locator("#uri").fill(str(target))
        page.locator("#by-uri button").click()
        page.wait_for_selector(".hit >> nth=3")
        page.wait_for_function("() => [...document.querySelectorAll('.hit img')].every(i => i.complete)")
        assert page.locator(".hit").count() == 4 and thumbnails_loaded(page)
        assert {Path(a).parent.name for a in page.locator(".hit img").evaluate_all("i => i.map(x => x.alt)")} \
            == {"photos-b"}
        page.screenshot(path=str(SHOTS / "07-collection-picked.png"), full_page=True)
        page.locator("#where").fill('colour == "red"')
        page.locator("#by-uri button").click()
        page.wait_for_selector("#error:has-text('400')")
        assert "unknown field 'colour'" in page.locator("#error").inner_text()
        assert not errors, errors
