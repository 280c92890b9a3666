"""Debian's Chromium, headless, driven through its chromedriver by the W3C WebDriver
protocol (JSON over HTTP on 127.0.0.1), as a person would use a page: open it, type
into a field, press a button, read what it shows.

The browser gets a home of its own whose NSS database holds the client certificates a
test gives it, and Chromium's AutoSelectCertificateForUrls policy (a managed policy
file, the one way a headless Chromium presents a client certificate) for the page's
address only; both are removed when the browser closes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import requests

from bench.common import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
POLICY_DIR = Path("/etc/chromium/policies/managed")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C name of an element reference


class WebDriverError(Exception):
    pass


class Browser:
    def __init__(self, url: str, session: str) -> None:
        self._url = url
        self._session = session

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = requests.request(
            method, f"{self._url}/session/{self._session}{path}", json=body, timeout=60
        )
        value = response.json().get("value")
        if response.status_code != 200:
            raise WebDriverError(f"{method} {path}: {value}")
        return value

    def open(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def source(self) -> str:
        return str(self._call("GET", "/source"))

    def text(self, css: str = "body") -> str:
        return str(self._call("GET", f"/element/{self._find(css)}/text"))

    def _find(self, css: str) -> str:
        found = self._call("POST", "/element", {"using": "css selector", "value": css})
        return str(found[ELEMENT])

    def count(self, css: str) -> int:
        found = self._call("POST", "/elements", {"using": "css selector", "value": css})
        return len(found)

    def type_into(self, css: str, text: str) -> None:
        self._call("POST", f"/element/{self._find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self._call("POST", f"/element/{self._find(css)}/click", {})

    def submit(self, css: str, timeout: float = 30) -> None:
        """Press the button CSS and wait until the page it leads to has loaded (a click
        may return while the form's answer is still on its way)."""
        before = self.measure("performance.timeOrigin")
        self.click(css)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(WebDriverError):  # between two pages
                now = self.measure("[performance.timeOrigin, document.readyState]")
                if now[0] != before and now[1] == "complete":
                    return
            if time.monotonic() > deadline:
                raise WebDriverError(f"pressing {css} led to no new page")
            time.sleep(0.05)

    def window(self, width: int, height: int) -> None:
        self._call("POST", "/window/rect", {"width": width, "height": height})

    def measure(self, expression: str) -> Any:
        """A value the test reads off the rendered page (the page itself runs no script)."""
        return self._call("POST", "/execute/sync", {"script": f"return {expression};", "args": []})


@contextlib.contextmanager
def chromium(
    home: Path,
    pages: Sequence[str] = (),
    client_certificates: Sequence[tuple[Path, str]] = (),
    server_pin: str = "",
) -> Iterator[Browser]:
    """A headless Chromium in HOME that trusts SERVER_PIN's key (sha256//...), holds the
    CLIENT_CERTIFICATES ((PKCS#12 file, passphrase)) and shows them to PAGES (origins)."""
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True)
    for bundle, passphrase in client_certificates:
        subprocess.run(
            ["pk12util", "-i", str(bundle), "-d", f"sql:{nssdb}", "-W", passphrase],
            check=True,
            capture_output=True,
        )
    policy = POLICY_DIR / f"zfs-unlock-test-{os.getpid()}-{home.name}.json"
    POLICY_DIR.mkdir(parents=True, exist_ok=True)
    patterns = [json.dumps({"pattern": page, "filter": {}}) for page in pages]
    policy.write_text(json.dumps({"AutoSelectCertificateForUrls": patterns}))
    port = free_port()
    environment = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    driver = subprocess.Popen(
        [str(CHROMEDRIVER), f"--port={port}"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    session = ""
    try:
        _wait_for_driver(url)
        arguments = [
            "--headless=new",
            "--no-sandbox",  # as root, which the managed policy file needs anyway
            "--disable-gpu",
            f"--user-data-dir={home / 'profile'}",
            "--window-size=1024,768",
        ]
        if server_pin:
            arguments.append(f"--ignore-certificate-errors-spki-list={server_pin[8:]}")
        created = requests.post(
            f"{url}/session",
            json={
                "capabilities": {
                    "alwaysMatch": {
                        "browserName": "chrome",
                        "goog:chromeOptions": {"binary": str(CHROMIUM), "args": arguments},
                    }
                }
            },
            timeout=60,
        ).json()["value"]
        session = created["sessionId"]
        yield Browser(url, session)
    finally:
        if session:
            with contextlib.suppress(requests.RequestException):
                requests.delete(f"{url}/session/{session}", timeout=30)
        driver.terminate()
        driver.wait(timeout=30)
        policy.unlink(missing_ok=True)
        shutil.rmtree(home / "profile", ignore_errors=True)


def _wait_for_driver(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/status", timeout=2).json()["value"]["ready"]:
                return
        if time.monotonic() > deadline:
            raise WebDriverError("chromedriver did not start")
        time.sleep(0.1)
