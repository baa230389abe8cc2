"""Headless Chromium for the fleet page's tests: Debian's `chromium` driven through
Debian's `chromium-driver` by Selenium (no browser download, no Selenium Manager).
Missing either fails the test with the command that installs them (`make test`
installs them when run as root)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1440,1000",
    "--no-proxy-server",
)
WAIT_S = 30.0
"""Bound of every wait for the page (never a timing assertion)."""


def _find(name: str, debian_path: str) -> str:
    found = shutil.which(name) or (debian_path if os.access(debian_path, os.X_OK) else None)
    if found is None:
        pytest.fail(
            f"{name} not found: run `make test` as root (it installs Debian's chromium and "
            "chromium-driver), or `sudo apt-get install chromium chromium-driver`",
            pytrace=False,
        )
    return found


def start_chromium(profile: Path, log: Path) -> webdriver.Chrome:
    """A new headless Chromium with a fresh profile directory."""
    browser = _find("chromium", "/usr/bin/chromium")
    driver = _find("chromedriver", "/usr/bin/chromedriver")
    options = Options()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch anything
    try:
        return webdriver.Chrome(
            service=Service(executable_path=driver, log_output=str(log)), options=options
        )
    except WebDriverException as exc:
        pytest.fail(f"cannot start {browser} through {driver}: {exc.msg}", pytrace=False)


def wait_until(
    driver: webdriver.Chrome, cond: Callable[[webdriver.Chrome], object], what: str
) -> None:
    """Poll cond until it is truthy; fail naming `what` after WAIT_S (bounds a hang)."""
    WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(cond, f"timed out waiting for {what}")
