"""Headless Chromium driven over the DevTools protocol, for the gallery's browser test and its
README screenshot (`python -m vap_cli.gallery_shot`).

`--remote-debugging-pipe`: the protocol's JSON messages, each ended by a NUL byte, on file
descriptors 3 (to the browser) and 4 (from it). No port, no websocket library, nothing downloaded:
the browser is Debian's `chromium-headless-shell` (or `chromium`), which `make browser` installs.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
# Flags that run as root on a machine without a display or network.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--remote-debugging-pipe",
)
INSTALL_HINT = "install it with `make browser` (apt-get install chromium-headless-shell)"


class BrowserError(Exception):
    pass


def find_chromium() -> str:
    """`VAP_CHROMIUM`, else the first Chromium on PATH."""
    named = os.environ.get("VAP_CHROMIUM")
    if named:
        found = shutil.which(named)
        if not found:
            raise BrowserError(f"VAP_CHROMIUM={named!r} is not an executable")
        return found
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserError(f"no Chromium found ({', '.join(CANDIDATES)}): {INSTALL_HINT}")


def _high(fd: int) -> int:
    """A close-on-exec copy of `fd` numbered 10 or more (so placing the pipe ends at 3 and 4 in
    the child can never overwrite one with the other), the original closed."""
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return copy


class Browser:
    """One headless Chromium with a fresh profile; `page()` opens a tab."""

    def __init__(self, executable: str | None = None, timeout_s: float = 30.0) -> None:
        self.executable = executable or find_chromium()
        self.timeout_s = timeout_s
        self._next_id = 0
        self._lock = threading.Lock()
        self._replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._pid = 0
        self._profile = ""
        self._to_browser = -1
        self._from_browser = -1
        self._reader: threading.Thread | None = None
        self._closed = False

    def __enter__(self) -> Browser:
        self._profile = tempfile.mkdtemp(prefix="vap-chromium-")
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        child_in, child_out = _high(to_r), _high(from_w)
        devnull = _high(os.open(os.devnull, os.O_RDWR))
        log = _high(os.open(Path(self._profile, "stderr.log"), os.O_WRONLY | os.O_CREAT, 0o600))
        argv = [self.executable, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"]
        try:
            self._pid = os.posix_spawn(
                self.executable,
                argv,
                dict(os.environ),
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, devnull, 0),
                    (os.POSIX_SPAWN_DUP2, devnull, 1),
                    (os.POSIX_SPAWN_DUP2, log, 2),
                    (os.POSIX_SPAWN_DUP2, child_in, 3),
                    (os.POSIX_SPAWN_DUP2, child_out, 4),
                ],
            )
        finally:
            for fd in (child_in, child_out, devnull, log):
                os.close(fd)
        self._to_browser, self._from_browser = to_w, from_r
        self._reader = threading.Thread(target=self._read, name="chromium-devtools", daemon=True)
        self._reader.start()
        try:
            self.call("Browser.getVersion")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- protocol ---------------------------------------------------------------------------------
    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                self._dispatch(json.loads(raw))
        with self._lock:  # the browser went away: wake every caller
            for waiting in self._replies.values():
                waiting.put({"error": {"message": "the browser closed the connection"}})

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            with self._lock:
                waiting = self._replies.get(int(message["id"]))
            if waiting is not None:
                waiting.put(message)
            return
        page = self._pages.get(str(message.get("sessionId") or ""))
        if page is not None:
            page._event(str(message.get("method")), message.get("params") or {})

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout_s: float = 0,
    ) -> dict[str, Any]:
        timeout_s = timeout_s or self.timeout_s
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            waiting: queue.Queue[dict[str, Any]] = queue.Queue()
            self._replies[ident] = waiting
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_browser, json.dumps(message).encode("utf-8") + b"\0")
            reply = waiting.get(timeout=timeout_s)
        except queue.Empty:
            raise BrowserError(f"{method}: no answer from Chromium in {timeout_s:.0f} s") from None
        except OSError as exc:
            raise BrowserError(f"{method}: Chromium is gone ({exc}); {self._stderr_tail()}") from None
        finally:
            with self._lock:
                self._replies.pop(ident, None)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return dict(reply.get("result") or {})

    def _stderr_tail(self) -> str:
        try:
            return Path(self._profile, "stderr.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def page(self, width: int = 1280, height: int = 900) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session, target)
        self._pages[session] = page
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(domain, session=session)
        page.viewport(width, height)
        return page

    def close_pages(self) -> None:
        """Close every tab opened (their looping videos would keep decoding in the background)."""
        for page in list(self._pages.values()):
            page.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pid:
            with contextlib.suppress(BrowserError, OSError):
                self.call("Browser.close", timeout_s=5)
            if not self._wait(5.0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGKILL)
                self._wait(5.0)
        for fd in (self._to_browser, self._from_browser):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)

    def _wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(self._pid, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid:
                return True
            time.sleep(0.05)
        return False


class Page:
    """One tab: navigate, evaluate, screenshot; collects what the page logs as errors."""

    def __init__(self, browser: Browser, session: str, target: str) -> None:
        self.browser, self.session, self.target = browser, session, target
        self.errors: list[str] = []
        self._loaded = threading.Event()

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired":
            self._loaded.set()
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails") or {}
            text = (details.get("exception") or {}).get("description") or details.get("text")
            self.errors.append(f"uncaught exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args") or []
            text = " ".join(str(a.get("value", a.get("description"))) for a in args)
            self.errors.append(f"console.{params.get('type')}: {text}")
        elif method == "Log.entryAdded":
            entry = params.get("entry") or {}
            if entry.get("level") == "error":
                where = f" ({entry['url']})" if entry.get("url") else ""
                self.errors.append(f"{entry.get('source')}: {entry.get('text')}{where}")

    def call(self, method: str, params: dict[str, Any] | None = None, timeout_s: float = 0) -> dict[str, Any]:
        return self.browser.call(method, params, self.session, timeout_s)

    def close(self) -> None:
        if self.browser._pages.pop(self.session, None) is not None:
            self.browser.call("Target.closeTarget", {"targetId": self.target})

    def viewport(self, width: int, height: int) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def goto(self, url: str, timeout_s: float = 30.0) -> None:
        self._loaded.clear()
        answer = self.call("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise BrowserError(f"could not open {url}: {answer['errorText']}")
        if not self._loaded.wait(timeout_s):
            raise BrowserError(f"{url} did not finish loading in {timeout_s:.0f} s")

    def evaluate(self, expression: str, timeout_s: float = 30.0) -> Any:
        """The value of `expression` (a promise is awaited), as JSON."""
        answer = self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            timeout_s=timeout_s,
        )
        if answer.get("exceptionDetails"):
            details = answer["exceptionDetails"]
            text = (details.get("exception") or {}).get("description") or details.get("text")
            raise BrowserError(f"the page's script failed: {text}")
        return (answer.get("result") or {}).get("value")

    def screenshot(self) -> bytes:
        """A PNG of the viewport."""
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        return base64.b64decode(data)


# Resolves once every video can show a frame (readyState >= HAVE_CURRENT_DATA) or failed, and
# every image finished, or after `timeout_ms`; the state of each, for assertions and reports.
MEDIA_STATE = """
new Promise(function (resolve) {
  var deadline = Date.now() + %(timeout_ms)d;
  function state() {
    var videos = Array.prototype.slice.call(document.querySelectorAll("video"));
    var images = Array.prototype.slice.call(document.querySelectorAll("img"));
    return {
      videos: videos.map(function (v) {
        return {src: v.currentSrc, readyState: v.readyState, error: v.error ? v.error.code : null,
                width: v.videoWidth, paused: v.paused};
      }),
      images: images.map(function (i) {
        return {src: i.currentSrc, complete: i.complete, width: i.naturalWidth};
      })
    };
  }
  (function check() {
    var s = state();
    var waiting = s.videos.some(function (v) { return v.readyState < 2 && v.error === null; }) ||
      s.images.some(function (i) { return !i.complete; });
    if (!waiting || Date.now() > deadline) { resolve(s); } else { setTimeout(check, 50); }
  }());
})
"""


def media_state(page: Page, timeout_s: float = 20.0) -> dict[str, Any]:
    """Waits for the page's media (see MEDIA_STATE) and returns their states."""
    found = page.evaluate(MEDIA_STATE % {"timeout_ms": int(timeout_s * 1000)}, timeout_s=timeout_s + 10)
    return dict(found or {})
