"""The labeling page in a real browser: headless Chromium (Debian's package) clicks through
3 comparisons, the store holds exactly those 3 labels, and a reload shows the 4th pair.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
messages separated by NUL bytes on fds 3 and 4), so no driver library or websocket client
is needed. Without Chromium the test skips, saying how to get it
(`bash scripts/setup_browser.sh`, or HH_JAX_CHROMIUM=/path/to/chrome).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time

import pytest
from test_label_store import lines_of, make_pair

from hh_jax.label import server as srv
from hh_jax.label import store as st

NAMES = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome",
         "google-chrome-stable")
TIMEOUT = 60.0  # seconds; Chromium starts slowly on two busy cores


def find_chromium() -> str | None:
    if os.environ.get("HH_JAX_CHROMIUM"):
        return os.environ["HH_JAX_CHROMIUM"]
    return next((p for p in map(shutil.which, NAMES) if p), None)


class Chromium:
    """A headless Chromium with one page, spoken to over the DevTools pipe."""

    def __init__(self, exe: str, profile: str, log_path: str):
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()
        args = [exe, "--headless", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu",
                "--disable-extensions", "--disable-dev-shm-usage", "--window-size=1200,1600",
                "about:blank"]
        if os.geteuid() == 0:  # Chromium refuses to run its sandbox as root
            args.insert(1, "--no-sandbox")
        # bash (dash takes no fd above 9) puts our pipe ends on fds 3 (Chromium reads) and 4
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_chrome} 4>&{from_chrome}', "bash", *args],
            pass_fds=(to_chrome, from_chrome), stdout=self.log, stderr=subprocess.STDOUT)
        os.close(to_chrome)
        os.close(from_chrome)
        self._next_id, self._replies, self.events = 0, {}, queue.Queue()
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target,
                                     flatten=True)["sessionId"]
        except BaseException:
            self.close()  # no browser left behind
            raise

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._in, 1 << 16):
            buf += chunk
            *msgs, buf = buf.split(b"\0")
            for raw in msgs:
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    self.events.put(msg)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        with self._cond:
            self._next_id += 1
            mid = self._next_id
        msg = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._replies, TIMEOUT):
                raise TimeoutError(f"{method}: no reply in {TIMEOUT} s")
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def page(self, method: str, **params) -> dict:
        return self.call(method, self.session, **params)

    def js(self, expression: str):
        res = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, want=True) -> None:
        deadline, got = time.monotonic() + TIMEOUT, None
        while time.monotonic() < deadline:
            got = self.js(expression)
            if got == want:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{expression} is {got!r}, not {want!r} after {TIMEOUT} s")

    def click(self, selector: str) -> None:
        """A real mouse click (press + release) at the element's centre."""
        rect = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                       "e.scrollIntoView({block: 'center'});"
                       "const r = e.getBoundingClientRect();"
                       "return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=kind, x=rect["x"], y=rect["y"],
                      button="left" if kind != "mouseMoved" else "none", clickCount=1)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._out, self._in):
            os.close(fd)
        self.log.close()


@pytest.fixture
def browser(tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium found (looked for " + ", ".join(NAMES) + "): install "
                    "Debian's package with `bash scripts/setup_browser.sh` (apt-get install "
                    "chromium, as root) or set HH_JAX_CHROMIUM=/path/to/chrome")
    chrome = Chromium(exe, str(tmp_path / "profile"), str(tmp_path / "chromium.log"))
    yield chrome
    chrome.close()


PAIR_ID = "document.getElementById('pair')?.dataset.pairId"  # null-safe: page loading


def test_label_three_by_clicking_then_reload_resumes(browser, tmp_path):
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "labels.jsonl"
    evil = make_pair(0, response_a=' <img src=x onerror="document.title=\'pwned\'"> A0')
    st.write_pairs(pairs, [evil] + [make_pair(i) for i in range(1, 6)])
    server = srv.make_server(str(pairs), str(out), labeler="browser")
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        browser.page("Page.navigate", url=server.url)
        browser.wait_for(PAIR_ID, "p0")
        # model output is shown as text, never parsed as HTML
        assert browser.js("document.getElementById('response-a').textContent").startswith(
            "<img src=x")
        assert browser.js("document.querySelectorAll('img').length") == 0
        browser.wait_for("document.getElementById('progress')?.textContent",
                         "0 of 6 labeled")
        want = [("p0", "b", 3), ("p1", "a", None), ("p2", "b", None)]
        for i, (pid, choice, strength) in enumerate(want):
            browser.wait_for(PAIR_ID, pid)
            if strength:
                browser.click(f"input[name=strength][value='{strength}']")
            browser.click(f"#choose-{choice}")
            browser.wait_for(PAIR_ID, f"p{i + 1}")  # the next pair is shown
        rows = lines_of(out)
        assert [(r["id"], r["choice"], r["strength"]) for r in rows] == want
        assert {r["labeler"] for r in rows} == {"browser"}
        assert browser.js("document.title") != "pwned"
        browser.js("window.beforeReload = true")
        browser.page("Page.reload", ignoreCache=True)
        browser.wait_for("window.beforeReload === undefined")  # a new document
        browser.wait_for(PAIR_ID, "p3")
        browser.wait_for("document.getElementById('progress')?.textContent",
                         "3 of 6 labeled")
        assert "question 3?" in browser.js("document.getElementById('conversation').innerText")
        assert len(lines_of(out)) == 3  # a reload labels nothing
    finally:
        server.shutdown()
        server.server_close()
        server.RequestHandlerClass.app.store.close()
