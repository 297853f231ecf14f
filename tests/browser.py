"""Headless Chromium for the tests: the binary, its flags, and a DevTools-protocol client for
pages that only exist after their JavaScript ran (MLflow's UI).

Without Chromium the browser tests skip, unless DDPM_ABLATE_REQUIRE_SERVERS=1 (CI), where a
missing browser fails them (``require_chromium``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRE = os.environ.get("DDPM_ABLATE_REQUIRE_SERVERS") == "1"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> str:
    """The Chromium binary; skips the test without one (fails it under DDPM_ABLATE_REQUIRE_SERVERS=1)."""
    if CHROMIUM is None:
        reason = "chromium is not on PATH (CI installs the Debian package)"
        if REQUIRE:
            pytest.fail(f"{reason} (DDPM_ABLATE_REQUIRE_SERVERS=1)")
        pytest.skip(reason)
    return CHROMIUM


class DevTools:
    """One headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
    the browser reads commands from fd 3 and answers on fd 4, NUL-separated JSON), so no port
    and no websocket library; one page, evaluated with ``evaluate``."""

    def __init__(self, profile: Path, window: tuple[int, int] = (1600, 1200)):
        command_read, self._command_write = os.pipe()
        self._reply_read, reply_write = os.pipe()

        def onto_3_and_4() -> None:  # in the child: dup out of the way first, fds may be 3 or 4 already
            command, reply = os.dup(command_read), os.dup(reply_write)
            os.dup2(command, 3)
            os.dup2(reply, 4)

        self.proc = subprocess.Popen(
            [
                require_chromium(),
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={window[0]},{window[1]}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            pass_fds=(3, 4),
            preexec_fn=onto_3_and_4,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(command_read)
        os.close(reply_write)
        self._buffer = b""
        self._next_id = 0
        self.session = ""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method: str, **params) -> dict:
        """One command; its result (events that arrive meanwhile are dropped)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._command_write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._reply_read, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"].get("text", "exception"))
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, interval: float = 0.5):
        """Evaluate ``expression`` until it is truthy or ``timeout`` seconds pass; its last value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(interval)

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.session = ""
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass  # it may close the pipe before it answers
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._command_write)
        os.close(self._reply_read)

    def __enter__(self) -> DevTools:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
