"""Headless Chromium for the tests of what a user sees in a browser, with every network request refused.

Pages are rendered offline on purpose: the proxy points at a closed port and every host name
fails to resolve, so a page that still needs a CDN renders blank here, as it would for a user
without a network. Loopback addresses (the tests' own servers) bypass the proxy, as Chromium
always lets them. Pages are driven through the Chrome DevTools protocol (websocket-client), so
no chromedriver or browser download is needed: Debian's `chromium` package is enough.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


def chromium() -> str:
    """The Chromium executable; the test is skipped, saying why, where none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium is not installed (apt-get install -y chromium); the browser tests need it")


def screenshot(url: str, path: Path, width: int = 1400, height: int = 1800) -> np.ndarray:
    """The page as Chromium draws it after its scripts ran, as an (H, W, 3) uint8 array."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                        f"--window-size={width},{height}", f"--screenshot={path}", url],
                       capture_output=True, timeout=120, check=True)
    return np.asarray(Image.open(path).convert("RGB"))


def rendered_dom(url: str) -> str:
    """The page's DOM after its scripts ran."""
    with tempfile.TemporaryDirectory() as profile:
        finished = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000",
                                   "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    return finished.stdout


class Page:
    """One browser tab under the DevTools protocol: evaluate JavaScript, set a file input's file."""

    def __init__(self, url: str, flags: tuple[str, ...] = ()):
        import websocket

        # Chromium's helper processes may still write into the profile while it exits.
        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self.process = subprocess.Popen([chromium(), *FLAGS, *flags, f"--user-data-dir={self.profile.name}",
                                         "--remote-debugging-port=0", "--window-size=1200,1600", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Chromium writes the port it bound (asked for port 0) into the profile folder.
        port_file = Path(self.profile.name) / "DevToolsActivePort"
        for _ in range(300):
            if port_file.is_file() and port_file.read_text().strip():
                break
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        import urllib.request

        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        page = next(target for target in targets if target["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.command("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def command(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.command("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120):
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError as error:
                if "execution context" not in str(error):  # the page is still being created
                    raise
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"{expression} stayed falsy for {timeout} s")

    def set_file(self, selector: str, path: Path) -> None:
        # As if the user picked the file: the input's change event fires.
        element = self.command("Runtime.evaluate", expression=f"document.querySelector({json.dumps(selector)})")
        self.command("DOM.setFileInputFiles", files=[str(path)], objectId=element["result"]["objectId"])

    def screenshot(self, path: Path) -> np.ndarray:
        import base64
        import io

        from PIL import Image

        data = base64.b64decode(self.command("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(data)
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.profile.cleanup()


def fake_webcam_flags(photo: Path, video: Path) -> tuple[str, ...]:
    """Chromium flags under which the webcam films `photo` (written to `video` as Y4M) and the page may use it
    without asking, as if the user had said yes."""
    from PIL import Image

    image = Image.open(photo).convert("RGB")
    image = image.resize((image.width // 2 * 2, image.height // 2 * 2))
    luma, blue, red = (np.asarray(plane) for plane in image.convert("YCbCr").split())
    chroma = [plane.reshape(plane.shape[0] // 2, 2, plane.shape[1] // 2, 2).mean(axis=(1, 3)).round().astype(np.uint8)
              for plane in (blue, red)]
    frame = b"FRAME\n" + luma.tobytes() + chroma[0].tobytes() + chroma[1].tobytes()
    video.write_bytes(f"YUV4MPEG2 W{image.width} H{image.height} F10:1 Ip A1:1 C420jpeg\n".encode() + frame * 10)
    return ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={video}")


def non_background_share(pixels: np.ndarray) -> float:
    """The share of pixels that differ from the page's most common colour (its background)."""
    flat = pixels.reshape(-1, 3).astype(np.int32)
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    background = colours[np.argmax(counts)]
    return float((np.abs(flat - background).sum(axis=1) > 30).mean())
