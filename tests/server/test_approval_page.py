"""The approval page in a real browser (Debian's Chromium, headless, through its
chromedriver), as an admin uses it: the list, approve, deny, on a phone's width, and the
refusals: no admin certificate, a removed admin, a forged or foreign form."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from bench.common import free_port
from tests.keyserver import SERVER_BIN, HostCreds, KeyServer, activated_key
from tests.pinned_requests import pinned_session
from tests.server.test_approval import POOL, ask, nonce, records, released
from tests.webdriver import Browser, chromium
from zfs_unlock_common import pinning

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="a headless Chromium takes client certificates from a managed policy"
)


# The floor (Debian 12's cryptography) keeps the whole round once: its PKCS#12 in the
# browser, the list, an approval. The rest of the page's cases are the page's own.
SLOW = pytest.mark.slow


@dataclass(frozen=True)
class Admin:
    name: str
    bundle: Path
    passphrase: str


@dataclass(frozen=True)
class Page:
    server: KeyServer
    url: str
    admin: Admin


def add_admin(server: KeyServer, name: str, directory: Path) -> Admin:
    bundle = directory / f"{name}.p12"
    with bundle.open("wb") as out:
        done = subprocess.run(
            [str(SERVER_BIN), "--data-dir", str(server.data_dir), "admin", "add", name],
            stdout=out,
            stderr=subprocess.PIPE,
            text=False,
            check=False,
        )
    said = done.stderr.decode()
    assert done.returncode == 0, said
    found = re.search(r"sealed with the passphrase (\S+);", said)
    assert found, said
    return Admin(name, bundle, found.group(1))


@pytest.fixture
def page(keyserver: KeyServer, tmp_path: Path) -> Iterator[Page]:
    port = free_port()
    keyserver.configure(approval={"page_listen": f"127.0.0.1:{port}", "poll_seconds": 1})
    alice = add_admin(keyserver, "alice", tmp_path)
    keyserver.start(workers=1)
    yield Page(keyserver, f"https://127.0.0.1:{port}", alice)


@pytest.fixture
def browser(page: Page, tmp_path: Path) -> Iterator[Browser]:
    """Alice's browser: her certificate, shown to the page."""
    with chromium(
        tmp_path / "alice-home",
        [page.url],
        [(page.admin.bundle, page.admin.passphrase)],
        page.server.pin,
    ) as opened:
        yield opened


def waiting_host(server: KeyServer, name: str) -> tuple[HostCreds, str, bytes, str, str]:
    """A host whose one key waits for approval: (host, dataset GUID, key, nonce, request)."""
    host = server.add_host(name)
    guid = str(int.from_bytes(os.urandom(4), "big") + 10)
    _, key = activated_key(server, host, POOL, guid, f"tank/{name}")
    server.must("host", "set", name, "--approval", "required")
    mine = nonce()
    request_id = ask(server, host, [guid], mine)["pending"]["id"]
    return host, guid, key, mine, request_id


def test_the_list_shows_what_waits_and_approving_it_releases_it_once(
    page: Page, browser: Browser
) -> None:
    host, guid, key, mine, request_id = waiting_host(page.server, "web1")
    browser.open(page.url + "/")
    shown = browser.text(f"#{request_id}")
    assert "web1: tank/web1" in shown and "required" in shown and "127.0.0.1" in shown
    assert "Signed in as alice" in browser.text()
    assert "web1" in browser.text("#hosts") and "required (timeout 600 s)" in browser.text("#hosts")

    browser.type_into(f"#{request_id} form[action='/approve'] input[name=reason]", "planned reboot")
    browser.submit(f"#{request_id} button.approve")
    # Back on the list: approved, waiting for its agent, and no Approve button any more.
    assert "approved by web:alice; waiting for its agent" in browser.text(f"#{request_id}")
    assert browser.count(f"#{request_id} button.approve") == 0
    [approved] = records(page.server, "approval_approved")
    assert (approved["actor"], approved["note"]) == ("web:alice", "planned reboot")

    assert released(ask(page.server, host, [guid], mine)) == {guid: key}
    browser.open(page.url + "/")
    assert browser.count(f"#{request_id}") == 0, "collected: no longer open"
    assert f"{request_id} web1 released web:alice planned reboot" in browser.text("#recent")


@SLOW
def test_denying_on_the_page_refuses_the_agent(page: Page, browser: Browser) -> None:
    host, guid, _, mine, request_id = waiting_host(page.server, "web2")
    browser.open(page.url + "/")
    browser.type_into(f"#{request_id} form[action='/deny'] input[name=reason]", "not planned")
    browser.submit(f"#{request_id} button.deny")
    assert browser.count(f"#{request_id}") == 0
    assert f"{request_id} web2 denied web:alice not planned" in browser.text("#recent")
    answer = ask(page.server, host, [guid], mine)
    assert answer["keys"] == [] and [d["dataset_guid"] for d in answer["denied"]] == [guid]


@SLOW
def test_on_a_phones_width_nothing_needs_sideways_scrolling(page: Page, browser: Browser) -> None:
    _, _, _, _, request_id = waiting_host(page.server, "phone")
    browser.window(390, 844)
    browser.open(page.url + "/")
    width = browser.measure("document.documentElement.clientWidth")
    assert width <= 390
    assert browser.measure("document.documentElement.scrollWidth") <= width
    for button in ("approve", "deny"):
        right = browser.measure(
            f"document.querySelector('#{request_id} button.{button}').getBoundingClientRect().right"
        )
        assert 0 < right <= width, (button, right, width)


@SLOW
def test_without_an_admin_certificate_the_page_shows_nothing(page: Page, tmp_path: Path) -> None:
    _, _, _, _, request_id = waiting_host(page.server, "hidden")
    with chromium(tmp_path / "nobody", [page.url], [], page.server.pin) as stranger:
        stranger.open(page.url + "/")
        text = stranger.text()
        source = stranger.source()
    assert "This page needs an admin certificate" in text
    assert request_id not in source and "hidden" not in source and "<form" not in source


@SLOW
def test_a_removed_admin_is_refused_at_once(page: Page, browser: Browser) -> None:
    _, _, _, _, request_id = waiting_host(page.server, "gone")
    page.server.must("admin", "remove", "alice")
    browser.open(page.url + "/")
    assert "This admin certificate is not registered" in browser.text()
    assert request_id not in browser.source()
    assert [r["admin"] for r in records(page.server, "admin_removed")] == ["alice"]


def pem_of(admin: Admin, directory: Path) -> Path:
    pem = directory / f"{admin.name}.pem"
    subprocess.run(
        ["openssl", "pkcs12", "-in", str(admin.bundle), "-passin", f"pass:{admin.passphrase}",
         "-nodes", "-out", str(pem)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return pem


@SLOW
def test_forged_stale_and_foreign_forms_change_nothing(page: Page, tmp_path: Path) -> None:
    _, _, _, _, request_id = waiting_host(page.server, "csrf")
    bob = add_admin(page.server, "bob", tmp_path)
    alice_pem, bob_pem = pem_of(page.admin, tmp_path), pem_of(bob, tmp_path)

    def session(pem: Path) -> requests.Session:
        client = pinned_session([pinning.parse_pin(page.server.pin)], pem, pem)
        client.max_redirects = 1  # requests looks at it even when it follows none
        return client

    def post(pem: Path, fields: dict[str, str], **headers: str) -> requests.Response:
        with session(pem) as client:
            return client.post(
                f"{page.url}/approve", data=fields, headers=headers, timeout=10,
                allow_redirects=False,
            )  # fmt: skip

    def token_for(pem: Path) -> str:
        with session(pem) as client:
            listing = client.get(page.url + "/", timeout=10).text
        found = re.search(r'name="csrf" value="([^"]+)"', listing)
        assert found
        return found.group(1)

    alices = token_for(alice_pem)
    stamp = alices.split(".")[0]
    attempts = [
        post(alice_pem, {"id": request_id, "csrf": token_for(bob_pem)}),  # another admin's
        post(alice_pem, {"id": request_id, "csrf": f"{int(stamp) - 13 * 3600}.{'0' * 64}"}),
        post(alice_pem, {"id": request_id}),
        post(alice_pem, {"id": request_id, "csrf": alices}, Origin="https://evil.example"),
        post(alice_pem, {"id": request_id, "csrf": alices}, Origin="null"),  # a sandboxed frame
        post(alice_pem, {"id": request_id, "csrf": alices}, **{"Sec-Fetch-Site": "cross-site"}),
    ]
    assert [a.status_code for a in attempts] == [403] * 6
    assert all("<form" not in a.text for a in attempts)
    assert records(page.server, "approval_approved") == []
    good = post(alice_pem, {"id": request_id, "csrf": alices, "reason": "ok"})
    assert good.status_code == 303 and good.headers["Location"] == f"/#{request_id}"
    assert good.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert [r["actor"] for r in records(page.server, "approval_approved")] == ["web:alice"]


def test_admin_list_and_the_bundle_a_browser_imports(page: Page, tmp_path: Path) -> None:
    listed = json.loads(page.server.must("admin", "list", "--json"))
    assert [a["name"] for a in listed] == ["alice"]
    pem = pem_of(page.admin, tmp_path).read_text()
    assert "PRIVATE KEY" in pem and pem.count("BEGIN CERTIFICATE") == 2  # hers and the CA's
    code, _, err = page.server.admin("admin", "add", "alice")
    assert code == 65 and "exists" in err
    assert (page.server.data_dir / "admin-ca.key").stat().st_mode & 0o777 == 0o400


def test_a_form_token_is_good_for_its_certificate_for_twelve_hours(tmp_path: Path) -> None:
    from zfs_unlock_server.approvalpage import TOKEN_LIFETIME, ApprovalPage
    from zfs_unlock_server.config import Layout, ServerConfig

    made = ApprovalPage(Layout(tmp_path), ServerConfig(), os.urandom(32))
    now = 1_800_000_000
    fresh, old = made.token("aa" * 32, now), made.token("aa" * 32, now - TOKEN_LIFETIME - 1)
    assert made.token_good(fresh, "aa" * 32, now)
    assert made.token_good(made.token("aa" * 32, now - TOKEN_LIFETIME), "aa" * 32, now)
    assert not made.token_good(old, "aa" * 32, now), "too old, though its MAC is right"
    assert not made.token_good(fresh, "bb" * 32, now), "another admin's certificate"
    assert not made.token_good(made.token("aa" * 32, now + 60), "aa" * 32, now), "from the future"
    other = ApprovalPage(Layout(tmp_path), ServerConfig(), os.urandom(32))
    assert not other.token_good(fresh, "aa" * 32, now), "another listener's secret"
