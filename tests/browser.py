"""A real headless Chromium for the console tests (Debian's chromium and chromium-driver)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def start_browser():
    """A headless Chromium driven by Selenium; skips the test where there is none."""
    if not (CHROMIUM and DRIVER):
        pytest.skip("console tests skipped: no chromium and chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                     "--disable-gpu", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))  # no Selenium Manager download
    driver.set_script_timeout(60)
    return driver


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"console-{name}.png"
    driver.save_screenshot(str(path))
    return path


def wait_for(driver, condition, timeout: float = 60, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except Exception:
        status = driver.find_element("id", "status").text
        logs = [entry["message"] for entry in driver.get_log("browser")][-10:]
        raise AssertionError(f"waited {timeout}s for {what}; page status: {status!r}; console: {logs}") from None


def text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


