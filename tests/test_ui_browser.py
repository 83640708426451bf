"""The web UI in a real headless Chromium, against ``perdure serve``.

A SQLite store is filled in-process (``ui_app.populate``: workflows that
complete, one after a retry, one that fails after three attempts, and a
cart actor with ten messages), then ``perdure serve`` serves it in a
subprocess and Selenium drives ``/usr/bin/chromium`` with the system
``/usr/bin/chromedriver`` (never a downloaded one).

The browser must start: if it cannot, the tests fail and say why, unless
``PERDURE_SKIP_BROWSER=1``. The actor slider's screenshot is saved in the
test's temporary directory; with ``PERDURE_UPDATE_SCREENSHOTS=1`` it is
also copied to ``metrics/ui_actor_slider.png``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

import perdure
import ui_app

pytestmark = pytest.mark.slow

SRC = Path(perdure.__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
METRICS = TESTS.parent / "metrics"
CHROMIUM = os.environ.get("PERDURE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PERDURE_CHROMEDRIVER", "/usr/bin/chromedriver")
TOKEN = "ui-test-token"
WAIT = 10.0


@dataclass
class Served:
    url: str
    ids: dict[str, str]
    states: list[Any]  # the cart's state after message k, as JSON, read with state_at(k)
    diffs: list[dict[str, tuple[Any, Any]]]  # diffs[k]: ActorRef.diff(k - 1, k)
    driver: Any
    artifacts: Path


def _browser_unavailable(why: str) -> None:
    if os.environ.get("PERDURE_SKIP_BROWSER") == "1":
        pytest.skip(f"PERDURE_SKIP_BROWSER=1: {why}")
    pytest.fail(
        f"the web UI's browser test cannot run: {why}. Install Chromium and its driver "
        "(apt-get install -y chromium chromium-driver; .ci/run does) and the dev extra "
        "(selenium), or set PERDURE_SKIP_BROWSER=1 to skip it",
        pytrace=False,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _populate(store: str) -> tuple[dict[str, str], list[Any], list[dict[str, Any]]]:
    rt = perdure.Runtime(
        store, workflows=[ui_app.ship_order, ui_app.book_ledger], actors=[ui_app.Cart]
    )
    async with rt:
        ids = await ui_app.populate(rt)
        cart = rt.client.actor(ui_app.Cart, "alice")
        states = [msgspec.to_builtins(await cart.state_at(k)) for k in range(11)]
        diffs = [{}] + [await cart.diff(k - 1, k) for k in range(1, 11)]
    return ids, states, diffs


def _start_browser() -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        _browser_unavailable(f"selenium is not installed ({exc})")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            _browser_unavailable(f"{path} is missing")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        "--window-size=1440,1000",
    ):
        options.add_argument(argument)
    try:
        return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except Exception as exc:
        _browser_unavailable(f"Chromium did not start: {type(exc).__name__}: {exc}")
        raise


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("ui")
    store = f"sqlite:///{directory}/perdure.db"
    ids, states, diffs = asyncio.run(_populate(store))
    driver = _start_browser()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]))
    command = [sys.executable, "-m", "perdure._cli", "serve", "--store", store]
    command += ["--app", "ui_app:DEFINITIONS", "--host", "127.0.0.1", "--port", str(_free_port())]
    proc = subprocess.Popen(
        [*command, "--token", TOKEN, "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        url = None
        while url is None:
            line = proc.stderr.readline()
            assert line, f"perdure serve exited: {proc.wait()}"
            if line.startswith("perdure: serving"):
                url = line.split(" on ")[1].split()[0]
        driver.set_window_size(1440, 1000)
        yield Served(url, ids, states, diffs, driver, directory)
    finally:
        driver.quit()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err


# -- helpers -------------------------------------------------------------------------------


def _wait(served: Served, condition: Any, what: str) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page re-renders as it loads: an element read a moment ago may be gone.
    wait = WebDriverWait(served.driver, WAIT, ignored_exceptions=[StaleElementReferenceException])
    return wait.until(lambda d: condition(d), message=what)


def _css(served: Served, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(served.driver.find_elements(By.CSS_SELECTOR, selector))


def _one(served: Served, selector: str) -> Any:
    found = _wait(served, lambda d: _css(served, selector), f"no element matches {selector!r}")
    return found[0]


def _open(served: Served, fragment: str = "") -> None:
    served.driver.get(f"{served.url}/ui/?token={TOKEN}{fragment}")
    _one(served, "body[data-ready]")


def _rows(served: Served) -> list[str]:
    rows: list[str] = served.driver.execute_script(
        "return [...document.querySelectorAll('#invocations tbody tr[data-id]')]"
        ".map((row) => row.dataset.id)"
    )
    return rows


def _type(served: Served, selector: str, text: str) -> None:
    box = _one(served, selector)
    box.clear()
    box.send_keys(text)


# -- the tests -----------------------------------------------------------------------------


def test_the_token_becomes_a_cookie_and_leaves_the_address_bar(served: Served) -> None:
    served.driver.get(f"{served.url}/invocations")
    assert "unauthorized" in served.driver.page_source
    _open(served)
    assert "token" not in served.driver.current_url
    assert served.driver.current_url.startswith(f"{served.url}/ui/")
    cookie = served.driver.get_cookie("perdure_ui")
    assert cookie is not None
    assert cookie["httpOnly"]
    assert cookie["value"] != TOKEN
    served.driver.get(served.url + "/")  # the root redirects to the UI, signed in
    _one(served, "body[data-ready]")
    assert served.driver.current_url == f"{served.url}/ui/"


def test_the_list_shows_every_invocation_and_the_search_filters_it(served: Served) -> None:
    _open(served)
    rows = _wait(served, lambda d: len(_rows(served)) == 14 and _rows(served), "14 rows")
    assert set(served.ids.values()) <= set(rows)  # 3 workflows and 11 actor messages
    actors = [
        (a.get_attribute("data-type"), a.get_attribute("data-key"))
        for a in _css(served, "#actors li")
    ]
    assert actors == [("Cart", "alice"), ("Cart", "bob")]

    _type(served, "#search", "ledger")
    _wait(served, lambda d: _rows(served) == [served.ids["ledger o-3"]], "only book_ledger")
    assert "1 of 14" in _one(served, "#invocation-count").text

    ship = served.ids["ship o-2"]
    _type(served, "#search", ship[-6:])  # an id substring
    _wait(served, lambda d: _rows(served) == [ship], f"only {ship}")

    _type(served, "#search", "failed")
    _wait(served, lambda d: _rows(served) == [served.ids["ledger o-3"]], "only the failed one")

    _type(served, "#search", "")
    from selenium.webdriver.support.ui import Select

    Select(_one(served, "#status-filter")).select_by_value("failed")
    _wait(
        served, lambda d: _rows(served) == [served.ids["ledger o-3"]], "the server's status filter"
    )

    # An id that is not in the list can still be opened.
    Select(_one(served, "#status-filter")).select_by_value("")
    _wait(served, lambda d: len(_rows(served)) == 14, "every row again")
    _type(served, "#search", "0000dead-not-there")
    _one(served, "#open-id").click()
    error = _one(served, "#detail .error-text")
    assert "not_found" in error.text
    assert "0000dead-not-there" in error.text


def test_a_timeline_shows_each_entry_and_the_failed_attempts(served: Served) -> None:
    failed = served.ids["ledger o-3"]
    _open(served)
    _one(served, f'#invocations tr[data-id="{failed}"]').click()
    _one(served, f'#invocation-view[data-id="{failed}"]')
    entries = _css(served, "#timeline li.entry")
    assert [e.get_attribute("data-index") for e in entries] == ["0", "1", "2", "3"]
    names = [e.find_element("css selector", ".name").text for e in entries]
    assert names == ["book_ledger", "reserve", "ledger", "book_ledger"]
    kinds = [e.find_element("css selector", ".kind").text.lower() for e in entries]
    assert kinds == ["input", "step", "step", "output"]
    assert "start" in entries[0].text
    assert "ms" in entries[1].find_element("css selector", ".delta").text
    assert entries[1].get_attribute("class").split() == ["entry", "ok"]
    ledger = entries[2]
    assert "error" in ledger.get_attribute("class").split()
    assert "3 attempts" in ledger.text
    attempts = ledger.find_elements("css selector", "li.attempt")
    assert [a.find_element("css selector", ".attempt-no").text for a in attempts] == [
        "attempt 1 failed",
        "attempt 2 failed",
    ]
    assert "RuntimeError: ledger rejected o-3" in attempts[0].text
    assert "RuntimeError: ledger rejected o-3" in _one(served, ".outcome-box.error").text
    served.driver.save_screenshot(str(served.artifacts / "ui_timeline.png"))

    # A step that failed once and then went through: retried, not an error.
    retried = served.ids["ship o-1"]
    served.driver.get(f"{served.url}/ui/#/invocation/{retried}")
    _one(served, f'#invocation-view[data-id="{retried}"]')
    charge = _one(served, '#timeline li.entry[data-index="2"]')
    assert charge.get_attribute("class").split() == ["entry", "ok", "retried"]
    assert "attempt 1 failed" in charge.text
    assert "ConnectionError: bank unreachable while charging o-1" in charge.text
    assert '"tx-o-1"' in charge.text


def test_the_fork_button_shows_the_fork_result(served: Served) -> None:
    failed = served.ids["ledger o-3"]
    served.driver.get(f"{served.url}/ui/#/invocation/{failed}")
    _one(served, f'#invocation-view[data-id="{failed}"]')
    _type(served, "#fork-upto", "2")
    _one(served, "#fork-button").click()
    box = _one(served, '#fork-result .fork-box[data-status="stopped"]')
    assert 'Stopped before step "ledger" (journal index 2)' in box.text
    assert "1 step(s) replayed, 0 executed" in box.text

    shipped = served.ids["ship o-2"]
    served.driver.get(f"{served.url}/ui/#/invocation/{shipped}")
    _one(served, f'#invocation-view[data-id="{shipped}"]')
    _one(served, "#fork-button").click()  # all but the output: every step replays
    box = _one(served, '#fork-result .fork-box[data-status="completed"]')
    assert '"transaction": "tx-o-2"' in box.text


def test_the_actor_slider_travels_through_the_states(served: Served) -> None:
    from selenium.webdriver.common.keys import Keys

    _open(served)
    _one(served, '#actors li[data-key="alice"] a').click()
    _one(served, '#actor-view[data-at="10"]')
    slider = _one(served, "#actor-slider")
    assert slider.get_attribute("type") == "range"
    assert slider.get_attribute("max") == "10"
    slider.send_keys(Keys.HOME)
    _one(served, '#actor-view[data-at="0"]')
    assert _state(served) == served.states[0]
    for k in range(1, 7):
        slider.send_keys(Keys.ARROW_RIGHT)
        _one(served, f'#actor-view[data-at="{k}"]')
        assert _state(served) == served.states[k], f"state after message {k}"
        assert _changes(served) == _expected_changes(served.diffs[k]), f"diff of message {k}"
    assert _one(served, "#slider-label").text == "after message 6 of 10"

    # Message 6 removed the pear: the state shows it gone, the total changed.
    message = _one(served, "#message").text
    assert "Cart.remove" in message
    assert '"pear"' in message
    removed = _one(served, '#state-table tr.removed[data-path="items.pear"]')
    assert "1" in removed.text
    changed = _one(served, '#state-table tr.changed[data-path="total_cents"]')
    assert "450" in changed.text
    assert "370" in changed.text
    assert not _css(served, "#state-table tr.changed[data-path='items.apple']")
    # User data is text, never markup: the note's <b> is shown, not rendered.
    assert "gift <b>wrap</b> & ribbon" in _one(served, "#state-table").text
    assert not _css(served, "#actor-view b")

    screenshot = served.artifacts / "ui_actor_slider.png"
    assert served.driver.save_screenshot(str(screenshot))
    if os.environ.get("PERDURE_UPDATE_SCREENSHOTS") == "1":
        METRICS.mkdir(exist_ok=True)
        shutil.copyfile(screenshot, METRICS / "ui_actor_slider.png")

    # The buttons step too, and the address keeps the position.
    _one(served, "#step-forward").click()
    _one(served, '#actor-view[data-at="7"]')
    assert _changes(served) == _expected_changes(served.diffs[7])
    assert (
        _one(served, '#changes li[data-path="items.fig"]').get_attribute("data-change") == "added"
    )
    assert served.driver.current_url.endswith("#/actor/Cart/alice/7")


def _state(served: Served) -> Any:
    return json.loads(_one(served, "#state-json").get_attribute("textContent"))


def _changes(served: Served) -> dict[str, str]:
    return {
        li.get_attribute("data-path"): li.get_attribute("data-change")
        for li in _css(served, "#changes li")
    }


def _expected_changes(diff: dict[str, tuple[Any, Any]]) -> dict[str, str]:
    def kind(before: Any, after: Any) -> str:
        if repr(before) == "<missing>":
            return "added"
        if repr(after) == "<missing>":
            return "removed"
        return "changed"

    return {path: kind(*change) for path, change in diff.items()}
