"""The tree explorer page (``arcfab_gym/service/static``), end to end in a real browser.

The real app (``create_app``, with a token, so the page's ``?token=`` bootstrap, its
``Authorization: Bearer`` fetches and the websocket's ``?token=`` are exercised) runs under
uvicorn in a background thread; Playwright drives Debian's Chromium (``/usr/bin/chromium``,
never a downloaded browser: do not run ``playwright install``). Any console error or
uncaught exception on the page fails the test. A screenshot goes to
``artifacts/explorer_e2e.png``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")


def _missing(reason: str) -> None:
    """Skip on a developer's machine; fail in CI, which installs both (.ci/run)."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the explorer's browser test: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if not CHROMIUM.exists():
    _missing("Debian's Chromium is missing at /usr/bin/chromium (apt-get install chromium); "
             "the explorer's end-to-end test drives it")
try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:
    _missing("the playwright package is missing (pip install playwright; do NOT run "
             "`playwright install`: the test uses /usr/bin/chromium)")

import uvicorn  # noqa: E402

from arcfab_gym.service import ServiceSettings, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "artifacts" / "explorer_e2e.png"
TOKEN = "e2e-token"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NODE = "[data-testid=tree-node]"
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def server():
    """The real app on a free port of 127.0.0.1, in a background thread."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ServiceSettings(token=TOKEN, max_sessions=8))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="explorer-e2e-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the app did not start under uvicorn")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def problems() -> list[str]:
    """Console errors and uncaught exceptions of the page; any left at the end fail the test."""
    return []


@pytest.fixture
def page(browser, server, problems):
    """The explorer, opened with the token, recording its errors into ``problems``."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)

    def on_console(msg) -> None:
        if msg.type == "error":
            problems.append(f"console.error: {msg.text}")

    pg.on("console", on_console)
    pg.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
    pg.goto(f"{server}/?token={TOKEN}")
    wait_idle(pg)
    yield pg
    context.close()
    assert not problems, "the page logged errors:\n" + "\n".join(problems)


def api(server: str, method: str, path: str, body: dict | None = None) -> dict:
    """Another client of the same server (to check live updates)."""
    req = urllib.request.Request(
        server + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def wait_idle(pg: Page) -> None:
    pg.wait_for_function("document.body.dataset.busy === '0'")
    bar = pg.get_by_test_id("status-bar")
    assert bar.get_attribute("data-state") != "error", f"status bar error: {bar.inner_text()}"


def node_count(pg: Page) -> int:
    return pg.locator(NODE).count()


def wait_nodes(pg: Page, n: int) -> None:
    pg.wait_for_function(f"document.querySelectorAll('{NODE}').length >= {n}")


def click_node(pg: Page, node_id: str, **kwargs) -> None:
    pg.locator(f"{NODE}[data-node-id='{node_id}'] circle.dot").click(**kwargs)


def nodes(pg: Page) -> list[dict]:
    return pg.locator(NODE).evaluate_all(
        "els => els.map(e => ({id: e.dataset.nodeId, session: e.dataset.session, "
        "frame: Number(e.dataset.frame), fill: e.dataset.fill}))"
    )


def natural_width(pg: Page, testid: str) -> int:
    return pg.get_by_test_id(testid).evaluate("img => img.complete ? img.naturalWidth : 0")


def wait_image(pg: Page, testid: str) -> None:
    pg.wait_for_function(
        f"(() => {{ const i = document.querySelector('[data-testid={testid}]'); "
        "return i && i.complete && i.naturalWidth > 0; })()"
    )


def step(pg: Page, x: float, y: float) -> None:
    before = node_count(pg)
    pg.get_by_test_id("action-input-0").fill(str(x))
    pg.get_by_test_id("action-input-1").fill(str(y))
    pg.get_by_test_id("step-button").click()
    wait_idle(pg)
    wait_nodes(pg, before + 1)


def test_explorer_create_step_fork_compare(page: Page, server: str) -> None:
    pg = page
    # --- create a session
    pg.get_by_test_id("backend-select").select_option("pusht-sim")
    pg.get_by_test_id("seed-input").fill("3")
    pg.get_by_test_id("create-session").click()
    wait_idle(pg)
    wait_nodes(pg, 1)
    assert node_count(pg) == 1
    sid = pg.evaluate("decodeURIComponent(location.hash.split('=')[1])")
    info = api(server, "GET", f"/api/sessions/{sid}")
    assert info["frame_index"] == 0 and info["backend"] == "pusht-sim"

    # --- the action pad sets the inputs: its centre is the action (0, 0)
    pad = pg.get_by_test_id("action-pad").bounding_box()
    pg.mouse.click(pad["x"] + pad["width"] * 0.75, pad["y"] + pad["height"] * 0.25)
    assert float(pg.get_by_test_id("action-input-0").input_value()) == pytest.approx(0.5, abs=0.03)
    assert float(pg.get_by_test_id("action-input-1").input_value()) == pytest.approx(-0.5, abs=0.03)

    # --- step a few times: one node per step, the new frame shown
    for x, y in [(0.2, -0.3), (0.4, 0.1), (-0.2, 0.5)]:
        step(pg, x, y)
    assert node_count(pg) == 4
    wait_image(pg, "node-frame")
    assert natural_width(pg, "node-frame") in (64, 96)
    first = nodes(pg)
    assert {n["frame"] for n in first} == {0, 1, 2, 3}
    assert len({n["session"] for n in first}) == 1

    # --- select frame 1 and fork a branch from it with a new seed
    node1 = next(n["id"] for n in first if n["frame"] == 1)
    click_node(pg, node1)
    wait_idle(pg)
    assert pg.get_by_test_id("node-meta").inner_text().count(node1) >= 1
    pg.get_by_test_id("fork-seed").fill("11")
    pg.get_by_test_id("fork-button").click()
    wait_idle(pg)
    wait_nodes(pg, 5)
    step(pg, -0.5, 0.5)
    step(pg, -0.6, 0.7)
    grown = nodes(pg)
    assert len(grown) == 7 > len(first)
    assert len({n["session"] for n in grown}) == 2, grown
    assert len({n["fill"] for n in grown}) >= 2, "the second branch has its own colour"
    assert pg.get_by_test_id("legend").locator(".item").count() >= 2
    wait_image(pg, "node-frame")
    branch_b = [n for n in grown if n["session"] != first[0]["session"]]
    fork_node = min(branch_b, key=lambda n: n["frame"])
    assert fork_node["frame"] == 1  # the fork checkpoint repeats its parent's frame

    # --- live: a step by another client shows up without touching the page
    assert pg.get_by_test_id("ws-status").get_attribute("data-state") == "on"
    new_sid = pg.evaluate("decodeURIComponent(location.hash.split('=')[1])")
    assert new_sid != sid
    api(server, "POST", f"/api/sessions/{new_sid}/step", {"action": [0.1, 0.1]})
    wait_nodes(pg, 8)
    pg.wait_for_function(
        "document.querySelector('[data-testid=status-bar]').textContent.startsWith('Live')"
    )

    # --- rewind one step: the session goes back a frame, the tree keeps its nodes
    frame_before = api(server, "GET", f"/api/sessions/{new_sid}")["frame_index"]
    pg.get_by_test_id("rewind-steps").fill("1")
    pg.get_by_test_id("rewind-button").click()
    wait_idle(pg)
    assert api(server, "GET", f"/api/sessions/{new_sid}")["frame_index"] == frame_before - 1
    assert node_count(pg) == 8

    # --- colour by return: a sequential scale with its legend
    pg.locator("label[for=color-return]").click()
    assert "Return" in pg.get_by_test_id("legend").inner_text()
    assert len({n["fill"] for n in nodes(pg)}) >= 3
    pg.locator("label[for=color-branch]").click()

    # --- compare: the leaf of branch A, then shift+click the leaf of branch B
    grown = nodes(pg)
    leaf_a = max((n for n in grown if n["session"] == sid), key=lambda n: n["frame"])
    leaf_b = max((n for n in grown if n["session"] == new_sid), key=lambda n: n["frame"])
    click_node(pg, leaf_a["id"])
    wait_idle(pg)
    click_node(pg, leaf_b["id"], modifiers=["Shift"])
    wait_idle(pg)
    assert pg.get_by_test_id("compare-a-id").inner_text() == leaf_a["id"]
    assert pg.get_by_test_id("compare-b-id").inner_text() == leaf_b["id"]
    wait_image(pg, "compare-frame-a")
    wait_image(pg, "compare-frame-b")
    assert "diverged from frame 2" in pg.get_by_test_id("compare-divergence").inner_text()
    assert pg.get_by_test_id("compare-state").get_attribute("data-state") == "diverged"
    strips = pg.get_by_test_id("compare-strips")
    assert strips.locator(".cell.diverged").count() >= 4
    assert strips.locator(".cell.shared").count() >= 2
    # slide back to frame 0: shared by both branches
    pg.get_by_test_id("compare-slider").evaluate(
        "s => { s.value = s.min; s.dispatchEvent(new Event('input', {bubbles: true})); }"
    )
    pg.wait_for_function(
        "document.querySelector('[data-testid=compare-state]').dataset.state === 'shared'"
    )
    assert pg.get_by_test_id("compare-frame-out").inner_text() == "0"
    wait_image(pg, "compare-frame-a")
    pg.get_by_test_id("compare-slider").evaluate(
        "s => { s.value = '3'; s.dispatchEvent(new Event('input', {bubbles: true})); }"
    )
    wait_image(pg, "compare-frame-b")
    pg.wait_for_function(  # the strip thumbnails load too
        "[...document.querySelectorAll('[data-testid=compare-strips] img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )

    pg.locator(".controls").evaluate("el => el.scrollTo(0, 0)")
    pg.mouse.move(0, 0)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SCREENSHOT))


def test_explorer_api_errors_reach_the_status_bar(page: Page, problems: list[str]) -> None:
    pg = page
    pg.get_by_test_id("backend-select").select_option("mini-dreamzero")
    pg.get_by_test_id("create-session").click()
    wait_idle(pg)
    wait_nodes(pg, 1)
    step(pg, 0.3, -0.2)
    wait_image(pg, "node-frame")
    assert natural_width(pg, "node-frame") > 0
    # Rewinding past the start is refused by the API; its detail shows in the status bar.
    pg.get_by_test_id("rewind-steps").fill("5")
    pg.get_by_test_id("rewind-button").click()
    pg.wait_for_function("document.body.dataset.busy === '0'")
    bar = pg.get_by_test_id("status-bar")
    assert bar.get_attribute("data-state") == "error"
    assert "rewind" in bar.inner_text()
    # A late live event (the step's, debounced) must not hide the error.
    pg.wait_for_timeout(600)
    assert bar.get_attribute("data-state") == "error" and "rewind" in bar.inner_text()
    # The browser logs the refused request itself; that one is expected.
    problems[:] = [p for p in problems if "the server responded with a status of 4" not in p]
