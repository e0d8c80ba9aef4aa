"""The service's page (``filo/service/static``) in headless Chromium, driven with Selenium.

The real app with the tiny test models runs in a live uvicorn server; every value the page shows
is compared with the API's own answer for the same image and settings (called directly with
httpx). Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``); without them the module is skipped. ``scripts/browser_check.sh``
runs only this file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.service_helpers import LiveServer, png_bytes, tiny_pipeline_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium "
                "chromium-driver); the page test needs chromium and chromedriver on PATH",
                allow_module_level=True)
pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
httpx = pytest.importorskip("httpx")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

TOKEN = "page-test-token-0123456789abcdef"
CLASS = "obj_a"
WAIT_S = 30
SHOT_FOR_LEAD = Path("/tmp/filo_page.png")


# ---- servers and browser ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(tiny_filo_ckpt, tiny_grounding_ckpt, bert_vocab_dir, synthetic_prompts):
    from filo.pipeline import build_pipeline

    return build_pipeline(tiny_pipeline_config(tiny_filo_ckpt, tiny_grounding_ckpt,
                                               bert_vocab_dir, synthetic_prompts))


def _serve(pipeline, out_dir: Path, token: str | None = None):
    from filo.service.app import create_app
    from filo.service.config import ServiceConfig
    from filo.service.engine import Engine

    return LiveServer(create_app(Engine(pipeline, ServiceConfig(), out_dir), ServiceConfig(),
                                 token=token))


@pytest.fixture(scope="module")
def service(pipeline, tmp_path_factory):
    """URL of the open service (no token)."""
    with _serve(pipeline, tmp_path_factory.mktemp("serve_out")) as url:
        yield url


@pytest.fixture(scope="module")
def secured_service(pipeline, tmp_path_factory):
    """URL of a service started with a token (the same pipeline; the tests use one at a time)."""
    with _serve(pipeline, tmp_path_factory.mktemp("serve_out_secured"), token=TOKEN) as url:
        yield url


@pytest.fixture(scope="module")
def driver():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1366,1000", "--no-first-run", "--disable-extensions",
                "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the driver's path is given: Selenium Manager never runs (nothing is downloaded)
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield drv
    finally:
        drv.quit()


# ---- helpers ------------------------------------------------------------------------------------
def _text(drv, element_id: str) -> str:
    return drv.find_element(By.ID, element_id).text.strip()


def _wait(drv, condition, what: str):
    """Wait for ``condition(drv)``; on timeout, fail with what the page shows."""
    try:
        return WebDriverWait(drv, WAIT_S, poll_frequency=0.05).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out waiting for {what}; status {_text(drv, 'status')!r}, "
                    f"message {_text(drv, 'message')!r}, error {_text(drv, 'error')!r}")


def _request_id(drv) -> str:
    return drv.find_element(By.ID, "score").get_attribute("data-request-id") or ""


def _wait_result(drv, previous_id: str, phrases: list[str] | None = None) -> str:
    """Wait for a shown result newer than ``previous_id`` (made with ``phrases``)."""

    def shown(d):
        rid = _request_id(d)
        if _text(d, "status") != "done" or not rid or rid == previous_id:
            return False
        if phrases is not None:
            got = d.find_element(By.ID, "score").get_attribute("data-phrases")
            return json.loads(got or "[]") == phrases
        return True

    _wait(drv, shown, f"a new result (phrases {phrases})")
    return _request_id(drv)


def _api(url: str, image: bytes, token: str | None = None, **form) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    res = httpx.post(f"{url}/v1/predict", files={"image": ("part.png", image, "image/png")},
                     data={"class_name": CLASS, **form}, headers=headers, timeout=60)
    assert res.status_code == 200, res.text
    return res.json()


def _table(drv) -> list[list[str]]:
    rows = drv.find_elements(By.CSS_SELECTOR, "#boxes tr")
    return [[td.text.strip() for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]


def _image_loaded(drv, element_id: str) -> tuple[int, str]:
    return drv.execute_script(
        "const img = document.getElementById(arguments[0]);"
        "return [img.complete ? img.naturalWidth : 0, img.src];", element_id)


def _assert_shows(drv, expected: dict) -> None:
    """The page shows ``expected`` (an API response for the same image and settings)."""
    assert _text(drv, "score") == f"{expected['image_score']:.4f}"
    shown = float(drv.find_element(By.ID, "score").get_attribute("data-score"))
    assert shown == pytest.approx(expected["image_score"], abs=1e-6)
    assert _text(drv, "position") == expected["position"]
    assert _text(drv, "verdict") == (expected["verdict"] or expected["verdict_note"])
    rows = _table(drv)
    assert [r[1] for r in rows] == [b["phrase"] for b in expected["boxes"]]
    assert [r[2] for r in rows] == [f"{b['score']:.3f}" for b in expected["boxes"]]
    assert [r[3] for r in rows] == ["yes" if b["counted"] else "no" for b in expected["boxes"]]
    for element_id in ("overlay", "mask"):
        width, src = _image_loaded(drv, element_id)
        assert width > 0, f"#{element_id} is not loaded"
        assert src.startswith("blob:"), src  # fetched with the token header, shown as a blob
    assert _image_loaded(drv, "mask")[0] == expected["image_size"][0]


def _save_full_page(drv, path: Path) -> None:
    """A screenshot of the whole page (the window made as tall as the page for it)."""
    size = drv.get_window_size()
    height = drv.execute_script("return document.documentElement.scrollHeight")
    try:
        drv.set_window_size(size["width"], min(int(height) + 150, 4000))
        drv.save_screenshot(str(path))
    finally:
        drv.set_window_size(size["width"], size["height"])


def _csp_violations(drv) -> list[str]:
    return [e["message"] for e in drv.get_log("browser")
            if "Content Security Policy" in e["message"] or "Refused to" in e["message"]]


# ---- tests --------------------------------------------------------------------------------------
def test_page_scores_edits_phrases_and_shows_errors(service, driver, tmp_path):
    from filo.prompts import load_prompt_table

    classes = httpx.get(f"{service}/v1/classes", timeout=30).json()
    driver.get(f"{service}/")
    _wait(driver, lambda d: _text(d, "status") == "ready", "the class list")
    select = Select(driver.find_element(By.ID, "class"))
    assert [o.get_attribute("value") for o in select.options] == \
        [c["name"] for c in classes["classes"]]
    select.select_by_value(CLASS)
    own = next(c["phrases"] for c in classes["classes"] if c["name"] == CLASS)
    assert driver.find_element(By.ID, "phrases").get_property("value") == "\n".join(own)
    for name, value in classes["defaults"].items():
        assert float(driver.find_element(By.ID, name).get_property("value")) == value, name
    # the header states each model's own input size (not one size for all)
    header = _text(driver, "models")
    sizes = classes["input_sizes"]
    assert f"FiLo input {sizes['filo']} px" in header
    assert f"short side {sizes['grounding']['short_side']} px" in header

    # 1. an image picked with the file input: the page shows the API's answer
    image = png_bytes(seed=3, size=(56, 40))
    path = tmp_path / "part.png"
    path.write_bytes(image)
    driver.find_element(By.ID, "file").send_keys(str(path))
    first = _wait_result(driver, "")
    expected = _api(service, image)
    _assert_shows(driver, expected)
    assert json.loads(driver.find_element(By.ID, "score").get_attribute("data-phrases")) == own

    # 2. edited phrases re-run by themselves and match the API with the same phrases
    phrases = driver.find_element(By.ID, "phrases")
    phrases.send_keys(Keys.CONTROL, "a")
    phrases.send_keys("hole\nstain")
    second = _wait_result(driver, first, phrases=["hole", "stain"])
    edited = _api(service, image, phrases="hole\nstain")
    assert edited["settings"]["phrases"] == ["hole", "stain"]
    assert (edited["image_score"] != expected["image_score"]
            or [b["phrase"] for b in edited["boxes"]] != [b["phrase"] for b in expected["boxes"]])
    _assert_shows(driver, edited)

    # 3. the prompt YAML holds the edited phrases and loads as a prompt table
    text = driver.find_element(By.ID, "yaml").get_property("value")
    assert '- "hole"' in text and '- "stain"' in text
    (tmp_path / "edited.yaml").write_text(text, encoding="utf-8")
    table = load_prompt_table(tmp_path / "edited.yaml")
    assert table.detail_phrases(CLASS) == ["hole", "stain"]
    driver.find_element(By.ID, "copy_yaml").click()
    _wait(driver, lambda d: _text(d, "copy_note") != "", "the copy note")

    driver.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "page.png"  # what a laptop screen shows
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 0
    _save_full_page(driver, SHOT_FOR_LEAD)

    # 4. an API error (422) is shown; the previous result stays
    box = driver.find_element(By.ID, "box_threshold")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("2")
    _wait(driver, lambda d: _text(d, "status") == "error", "the error state")
    error = _text(driver, "error")
    assert error.startswith("HTTP 422") and "box_threshold" in error, error
    assert driver.find_element(By.ID, "error").get_attribute("role") == "alert"
    assert _request_id(driver) == second

    # ... and goes away with a valid value (the default: the API's first answer again)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(classes["defaults"]["box_threshold"]))
    _wait_result(driver, second, phrases=["hole", "stain"])
    assert _text(driver, "error") == ""
    _assert_shows(driver, edited)
    assert _csp_violations(driver) == []


def test_page_with_token(secured_service, driver, tmp_path):
    driver.get(f"{secured_service}/")
    _wait(driver, lambda d: _text(d, "status") == "error", "the 401 of /v1/classes")
    assert _text(driver, "error").startswith("HTTP 401"), _text(driver, "error")

    driver.find_element(By.ID, "token").send_keys(TOKEN)
    _wait(driver, lambda d: _text(d, "status") == "ready", "the classes with the token")
    assert _text(driver, "error") == ""
    assert driver.execute_script("return sessionStorage.getItem('filo_token')") == TOKEN
    Select(driver.find_element(By.ID, "class")).select_by_value(CLASS)

    image = png_bytes(seed=5, size=(48, 48))
    path = tmp_path / "secured.png"
    path.write_bytes(image)
    driver.find_element(By.ID, "file").send_keys(str(path))
    _wait_result(driver, "")
    # the overlay and the mask need the token too: the page fetched them with it
    _assert_shows(driver, _api(secured_service, image, token=TOKEN))
    assert _csp_violations(driver) == []
