"""The chat page in a real browser: Debian's headless Chromium, driven by Selenium, against a
live server (tiny model, random loopback port). ``make test`` installs the browser
(scripts/ensure_browser.sh); the screenshot is kept in tests/artifacts/ (git-ignored)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")

from tunesmith.cli import parse_args  # noqa: E402
from tunesmith.config import DeployArgs  # noqa: E402
from tunesmith.serve.deploy import serve_in_thread  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no chromium/chromedriver (scripts/ensure_browser.sh installs them with apt)")
    return browser, driver


def open_browser(size: str = "1200,800"):
    """Headless Chromium; Selenium Manager is bypassed (it would try to download)."""
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium()
    opts = Options()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={size}", "--no-proxy-server"):  # fmt: skip
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def chat_in_page(
    url: str, message: str, shot: Path, key: str | None = None, temperature: str | None = None
) -> str:
    """Load the page, send ``message``, wait for the streamed answer; the answer's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    drv = open_browser()
    try:
        drv.get(url + "/")
        if key:  # the page keeps the key in localStorage, as after a user typed it once
            drv.execute_script("localStorage.setItem('tunesmith-key', arguments[0])", key)
            drv.get(url + "/")
        wait = WebDriverWait(drv, 120)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        if temperature is not None:
            drv.execute_script(
                "const t = document.getElementById('temperature'); t.value = arguments[0];"
                "t.dispatchEvent(new Event('input'));",
                temperature,
            )
        drv.find_element(By.ID, "input").send_keys(message)
        drv.find_element(By.ID, "send").click()
        # The answer grows while it streams: partial texts are seen before it is done.
        partial: set[int] = set()
        script = "const m = document.querySelector('.msg.assistant.streaming .text');" \
                 "return m ? m.textContent.length : -1;"  # fmt: skip
        deadline = time.monotonic() + 120
        while not drv.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"):
            if time.monotonic() > deadline:
                break
            n = drv.execute_script(script)
            if n > 0:
                partial.add(n)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".msg.assistant.done")))
        text = drv.find_element(By.CSS_SELECTOR, ".msg.assistant .text").text
        stats = drv.find_element(By.ID, "stats").text
        errors = [e.text for e in drv.find_elements(By.CSS_SELECTOR, ".msg.error")]
        shot.parent.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(shot))
        assert not errors, errors
        assert "tokens/s" in stats, stats
        assert len(partial) >= 2, f"the answer did not arrive in pieces: {partial}"
        return text
    finally:
        drv.quit()


def test_page_streams_an_answer(isolated_torch, tiny_model_dir: Path) -> None:
    chromium()
    argv = ["--model", str(tiny_model_dir), "--port", "0", "--torch_dtype", "float32",
            "--served_model_name", "tiny"]  # fmt: skip
    r = serve_in_thread(parse_args(DeployArgs, "deploy", "", argv))
    try:
        shot = ARTIFACTS / "chat_page_tiny.png"
        text = chat_in_page(r.url, "hello there", shot)
        assert text.strip(), "no answer streamed into the page"
        assert shot.stat().st_size > 1000
        assert r.server.scheduler.generated > 0
    finally:
        r.close()
