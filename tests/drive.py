"""Drive ``diffinv serve`` in a real headless Chromium (Selenium): the end-to-end test and the README's screenshot
(scripts/screenshot_app.py). Not part of the installed package: it lives with the tests.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``) and Selenium
(``pip install 'diffinv[test]'``). The browser is only ever pointed at the local server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")


def browser_missing() -> str | None:
    """Why the browser cannot run here (None: it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install 'diffinv[test]'"
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: apt-get install chromium chromium-driver"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(folder: Path, port: int, *args: str, env: dict | None = None, timeout: float = 180) -> Iterator[str]:
    """``diffinv serve`` on 127.0.0.1:port in a subprocess until the block ends; yields its URL."""
    cmd = [sys.executable, "-c", "from diffinv.cli import main; main()", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--output_dir", str(folder), *args]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"diffinv serve exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"diffinv serve did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Page:
    """One Chromium tab on the page, with the steps a person takes."""

    driver: object
    downloads: Path
    timings: dict[str, float] = field(default_factory=dict)

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, condition, timeout: float = 120, what: str = "the page"):
        """Poll ``condition()`` until it returns something true; its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = condition()
            except Exception:  # noqa: BLE001 - elements come and go while Svelte re-renders
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}; status: {self.status()!r}")
            time.sleep(0.1)

    def status(self) -> str:
        """The status box's text (without the progress overlay Gradio lays over it while a request runs)."""
        return self.driver.execute_script(
            "const el = document.querySelector('#status'); if (!el) return '';"
            "const c = el.cloneNode(true);"
            "c.querySelectorAll('[data-testid=status-tracker]').forEach(e => e.remove());"
            "return c.innerText.trim();")

    def type(self, elem_id: str, text: str) -> None:
        box = self.find(f"#{elem_id} textarea, #{elem_id} input")
        box.clear()
        box.send_keys(text)

    def upload(self, elem_id: str, path: Path) -> None:
        self.find(f"#{elem_id} input[type=file]").send_keys(str(Path(path).resolve()))
        self.wait(lambda: self.finds(f"#{elem_id} [aria-label='{Path(path).name}']"), 60,
                  f"the upload of {Path(path).name}")

    def choose(self, elem_id: str, value: str) -> None:
        """Pick ``value`` in a dropdown: open it, click the option."""
        box = self.find(f"#{elem_id} input")
        box.click()
        option = self.wait(lambda: self.finds(f"li[role=option][aria-label='{value}']"), 20,
                           f"option {value!r} of {elem_id}")[0]
        option.click()
        self.wait(lambda: self.find(f"#{elem_id} input").get_attribute("value") == value, 20, f"{elem_id} = {value}")

    def press(self, elem_id: str, name: str, timeout: float = 300) -> str:
        """Click a button and wait until the status box says something new; that text. The seconds it took go
        to ``timings[name]``."""
        before = self.status()
        t0 = time.perf_counter()
        self.find(f"#{elem_id}").click()
        text = self.wait(lambda: (s := self.status()) != before and s, timeout, f"{name} to finish")
        self.timings[name] = time.perf_counter() - t0
        return text

    def image_urls(self, elem_id: str) -> list[str]:
        return [img.get_attribute("src") for img in self.finds(f"#{elem_id} img") if img.get_attribute("src")]

    def download(self, elem_id: str, suffix: str, timeout: float = 60) -> Path:
        """Click a download button; the file it saved."""
        before = set(self.downloads.iterdir())
        self.find(f"#{elem_id}").click()
        return self.wait(lambda: next((p for p in self.downloads.iterdir()
                                       if p not in before and p.suffix == suffix), None), timeout, "the download")

    def resources(self) -> list[str]:
        """Every URL the page fetched (scripts, styles, fonts, images, API calls)."""
        return self.driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href])")

    def screenshot(self, path: Path, width: int = 1400) -> Path:
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(width, min(4000, height + 40))
        time.sleep(0.5)
        self.driver.save_screenshot(str(path))
        return path


@contextmanager
def chromium(url: str, width: int = 1400, height: int = 1200) -> Iterator[Page]:
    """Headless Chromium (a fresh profile, no network but the server) on ``url``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="diffinv-chromium-") as tmp:
        downloads = Path(tmp) / "downloads"
        downloads.mkdir()
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={Path(tmp) / 'profile'}")
        options.add_argument(f"--window-size={width},{height}")
        options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                  "download.prompt_for_download": False})
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        try:
            driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
            driver.get(url)
            page = Page(driver, downloads)
            page.wait(lambda: page.finds("#invert"), 60, "the page to load")
            yield page
        finally:
            driver.quit()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()
