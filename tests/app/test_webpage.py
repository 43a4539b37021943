"""The web page at ``/`` in headless Chromium against the live service (``greenroute serve`` on
the tiny ladder, API keys on): the page asks for the key, shows the ladder, streams an answer
under a quality floor, and shows the variant and the joules the API reports for that request.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make system-deps``): under CI their
absence fails the test; elsewhere it is skipped with the reason. Screenshots go to
``$GREENROUTE_TEST_ARTIFACTS`` (default ``build/test-artifacts``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app.conftest import LiveServer

CHROMEDRIVER = Path("/usr/bin/chromedriver")
KEY = "webpage-test-key-0123456789"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("GREENROUTE_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
PROMPT = "Tell me about energy."
WAIT_S = 120  # generous: the machine may be busy; nothing here measures time


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = [name for name, found in (("chromium", shutil.which("chromium")),
                                        ("chromium-driver", CHROMEDRIVER.exists())) if not found]
    if missing:
        message = f"not installed: {' '.join(missing)} (apt-get install {' '.join(missing)})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        set_viewport(driver, 1280, 800)
        yield driver
    finally:
        driver.quit()


def set_viewport(driver: Any, width: int, height: int) -> None:
    """Size the window so that the page itself gets ``width`` × ``height`` CSS pixels."""
    extra_w, extra_h = driver.execute_script(
        "return [outerWidth - innerWidth, outerHeight - innerHeight]")
    driver.set_window_size(width + extra_w, height + extra_h)


def wait(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S).until(condition)
    except TimeoutException:
        shot = ARTIFACTS / "webpage-timeout.png"
        driver.save_screenshot(str(shot))
        errors = driver.find_element("id", "form-error").text
        raise AssertionError(f"timed out waiting for {what} (page error: {errors!r}; "
                             f"screenshot {shot})") from None


def text(driver: Any, element_id: str) -> str:
    return str(driver.find_element("id", element_id).text)


def value(driver: Any, element_id: str) -> str:
    return str(driver.find_element("id", element_id).get_attribute("data-value"))


def finished(driver: Any, previous: str = "") -> bool:
    """The page shows a result other than ``previous``'s, or an error."""
    if driver.find_element("id", "form-error").text:
        return True
    shown = driver.find_elements("css selector", "#result:not([hidden])")
    return bool(shown) and text(driver, "r-id") not in ("", previous)


def answer_text(driver: Any) -> str:
    """The streamed answer exactly as received (``.text`` would trim its whitespace)."""
    return str(driver.execute_script("return document.getElementById('answer').textContent"))


def no_horizontal_scroll(driver: Any) -> bool:
    return bool(driver.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth"))


def test_page_streams_a_routed_answer_and_shows_its_cost(
        browser: Any, live_server: Callable[..., LiveServer]) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = live_server(api_keys=KEY)
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=60)
    ladder = api.get("/v1/variants").json()["data"]
    browser.get(f"{server.url}/")
    # the page asks for the key (nothing secret in the page); Enter submits it
    wait(browser, lambda d: d.find_element("id", "api-key").is_displayed(), "the key form")
    assert KEY not in browser.page_source
    browser.find_element("id", "api-key").send_keys(KEY, Keys.ENTER)
    wait(browser, lambda d: len(d.find_elements("css selector", "#ladder tbody tr"))
         == len(ladder), "the ladder table")
    rows = browser.find_elements("css selector", "#ladder tbody tr")
    assert [r.get_attribute("data-variant") for r in rows] == [v["name"] for v in ladder]
    assert not browser.find_element("id", "key-section").is_displayed()

    # labels on every control
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, select, textarea, button')]"
        ".filter(e => e.tagName === 'BUTTON' ? !e.textContent.trim()"
        " : !(e.labels && e.labels.length && e.labels[0].textContent.trim()))"
        ".map(e => e.id || e.name);")
    assert unlabelled == []

    # 1. chat, routed under a quality floor of 1.0 (only the reference model is eligible),
    # sampled with a seed (the tiny model's greedy answer is all newlines)
    browser.find_element("id", "prompt").send_keys(PROMPT)
    browser.find_element("id", "min-quality").send_keys("1")
    for field, typed in (("max-tokens", "24"), ("temperature", "1"), ("seed", "7")):
        browser.find_element("id", field).clear()
        browser.find_element("id", field).send_keys(typed)
    browser.find_element("id", "send").click()
    wait(browser, finished, "the first answer")
    assert text(browser, "form-error") == ""
    answer = browser.find_element("id", "answer")
    assert answer.get_attribute("data-state") == "done"
    streamed = answer_text(browser)
    assert int(answer.get_attribute("data-events")) >= 1 and streamed.strip()
    assert value(browser, "r-variant") == "full"
    request_id = text(browser, "r-id")
    entries = {e["id"]: e for e in api.get("/v1/requests/recent").json()["data"]}
    entry = entries[request_id]
    assert entry["variant"] == "full" and entry["budget"]["min_quality"] == 1.0
    assert entry["endpoint"] == "/v1/chat/completions"
    joules = entry["energy"]["joules"]
    assert float(value(browser, "r-joules")) == joules  # the exact number behind the figure
    assert float(text(browser, "r-joules")) == pytest.approx(joules, rel=1e-3)  # as shown
    # the only request so far: the service's own counter holds the same joules
    assert server.metric("greenroute_energy_joules_total", variant="full") == joules
    assert float(value(browser, "r-watts")) == entry["energy"]["avg_watts"]
    # the tokens that arrived are the API's answer to the same request on the same variant
    same = api.post("/v1/chat/completions", json={
        "model": "full", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
        "temperature": 1.0, "seed": 7}).json()
    assert streamed == same["choices"][0]["message"]["content"]
    assert text(browser, "r-source").startswith(entry["energy"]["source"])
    route = {r.get_attribute("data-variant"): r for r in
             browser.find_elements("css selector", "#route tbody tr")}
    assert set(route) == {v["name"] for v in ladder if v["loaded"]}
    assert "chosen" in route["full"].get_attribute("class")
    for name, row in route.items():
        if name != "full":
            assert row.text.endswith("no: quality below floor"), row.text
    assert browser.execute_script("return [innerWidth, innerHeight]") == [1280, 800]
    assert no_horizontal_scroll(browser)
    browser.save_screenshot(str(ARTIFACTS / "webpage.png"))

    # 2. completion, pinned to the distilled variant, sent from the keyboard (Ctrl+Enter)
    browser.find_element("css selector", "input[name=mode][value=completion]").click()
    Select(browser.find_element("id", "variant")).select_by_value("distilled")
    prompt = browser.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys("The sun is")
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)
    wait(browser, lambda d: finished(d, request_id), "the second answer")
    assert text(browser, "form-error") == ""
    assert value(browser, "r-variant") == "distilled" and text(browser, "r-reason") == "pinned"
    second = text(browser, "r-id")
    assert second != request_id
    entry = {e["id"]: e for e in api.get("/v1/requests/recent").json()["data"]}[second]
    assert entry["endpoint"] == "/v1/generate" and entry["pinned"]
    assert float(value(browser, "r-joules")) == entry["energy"]["joules"]
    same = api.post("/v1/generate", json={"prompt": "The sun is", "max_new_tokens": 24,
                                          "temperature": 1.0, "seed": 7,
                                          "variant": "distilled"}).json()
    assert answer_text(browser) == same["text"] and same["text"].strip()

    # the chart has drawn the requests, one series (legend entry) per variant
    def legend(d: Any) -> set[str]:
        return {e.text for e in d.find_elements("css selector", "#chart .u-legend th")}

    wait(browser, lambda d: {"full", "distilled"} <= legend(d), "the chart's series")
    assert browser.find_elements("css selector", "#chart canvas")
    assert "recent requests" in text(browser, "chart-summary")

    # a narrow window: one column, nothing wider than the window
    set_viewport(browser, 420, 860)
    assert browser.execute_script("return innerWidth") == 420
    wait(browser, no_horizontal_scroll, "the narrow layout")
    browser.save_screenshot(str(ARTIFACTS / "webpage-narrow.png"))
    assert (ARTIFACTS / "webpage.png").stat().st_size > 10_000
