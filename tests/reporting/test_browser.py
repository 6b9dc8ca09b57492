"""Checked in a real browser: a search's runs in MLflow's UI (headless Chromium).

After a real search, ``mlflow server`` serves its SQLite store on 127.0.0.1; headless
Chromium (Debian's ``chromium``, installed with apt-get when missing) opens the
experiment's runs page, expands the search's parent run and finds the ``uniform`` and
``greedy`` child runs, then opens MLflow's compare page for those two runs and reads
``test/accuracy`` of both from its metrics table. Chromium is driven through the
DevTools protocol with a tiny stdlib websocket client (no extra dependency).
Screenshots are kept under the test's tmp_path and copied to
``runs/test-artifacts/browser/``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest

from tests.helpers import mlflow_server, png_size, stop_process_group

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "runs" / "test-artifacts" / "browser"


# ----------------------------------------------------------------------------- Chromium


def ensure_chromium() -> str:
    """Chromium's path; installs Debian's ``chromium`` when missing, skips where it cannot."""
    found = shutil.which("chromium") or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)
    if found:
        return found
    if not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        pytest.skip("Chromium is not installed and installing it (apt-get install chromium) needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    last = None
    for update_first in (False, True):
        if update_first:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        last = subprocess.run(["apt-get", "install", "-y", "chromium"], env=env, capture_output=True, text=True,
                              timeout=1200)
        if last.returncode == 0 and os.access(CHROMIUM, os.X_OK):
            return CHROMIUM
    tail = (last.stderr or last.stdout or "").strip().splitlines()[-1:] if last else []
    pytest.skip(f"Chromium is not installed and `apt-get install -y chromium` failed: {' '.join(tail)[:300]}")


class DevTools:
    """A minimal Chrome DevTools Protocol client over a stdlib websocket (RFC 6455)."""

    def __init__(self, ws_url: str, timeout: float = 60.0):
        u = urllib.parse.urlparse(ws_url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            head += chunk
        head, self._buf = head.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"DevTools handshake failed: {head[:200]!r}")
        self._id = 0

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("DevTools connection closed")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _recv_message(self) -> dict:
        parts = []
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            data = self._read(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            if opcode == 0x9:  # ping
                self._send_frame(0xA, data)
            elif opcode == 0x8:
                raise ConnectionError("DevTools closed the websocket")
            elif opcode in (0x0, 0x1, 0x2):
                parts.append(data)
                if b0 & 0x80:
                    return json.loads(b"".join(parts))

    def call(self, method: str, **params):
        self._id += 1
        mid = self._id
        self._send_frame(0x1, json.dumps({"id": mid, "method": method, "params": params}).encode())
        while True:  # events in between are not needed
            msg = self._recv_message()
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"DevTools {method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error in {expr[:100]!r}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def wait_for(self, expr: str, timeout: float = 45.0, interval: float = 0.25):
        end = time.time() + timeout
        value = None
        while time.time() < end:
            try:  # the page may be between documents (body not there yet)
                value = self.evaluate(expr)
            except RuntimeError as e:
                value = None
                if "JS error" not in str(e):
                    raise
            if value:
                return value
            time.sleep(interval)
        return value

    def wheel(self, x: float, y: float, dy: float) -> None:
        self.call("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0, deltaY=dy)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def chromium(exe: str, profile: Path, width: int = 1700, height: int = 1100):
    """Headless Chromium with a fresh profile; yields a DevTools client of its page; stops it
    (its process group) on the way out."""
    profile.mkdir(parents=True, exist_ok=True)
    log = open(profile.parent / "chromium.log", "wb")
    proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
                             "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dt = None
    try:
        port_file = profile / "DevToolsActivePort"  # written by Chromium: the port it picked
        end = time.time() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if proc.poll() is not None or time.time() > end:
                raise RuntimeError(f"Chromium did not start (exit {proc.poll()}): "
                                   f"{(profile.parent / 'chromium.log').read_text(errors='replace')[-1500:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        dt = DevTools(page["webSocketDebuggerUrl"])
        dt.call("Page.enable")
        dt.call("Runtime.enable")
        yield dt
    finally:
        if dt is not None:
            dt.close()
        stop_process_group(proc)
        log.close()


def keep(path: Path) -> Path:
    """Copy a screenshot to runs/test-artifacts/browser/ (git-ignored) and return the copy."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(path, ARTIFACTS / path.name))


# ----------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def browser():
    return ensure_chromium()


@pytest.fixture(scope="module")
def searched(searched_tiny):
    cfg, out, _ = searched_tiny  # the shared search (tests/conftest.py)
    return cfg, out


def _anchor_texts(run_id: str) -> str:
    # the run-name links of a run in the runs table (href ends with /runs/<id>)
    return f"[...document.querySelectorAll('a[href$=\"/runs/{run_id}\"]')].map(a => a.textContent.trim()).join('|')"


# JS: the compare page's metrics section is two virtualized grids (names | values, one column per
# run, rows 45 px high, the values grid scrolls both). For the row `key`: its values (left to right),
# whether the row is inside the visible part of the values grid, and whether the name and the values
# are drawn on the same line; null while the row is not rendered.
_METRIC_ROW = """
((key) => {
  const link = [...document.querySelectorAll('a[title="Plot chart"]')].find(a => a.textContent.trim() === key);
  if (!link) return null;
  const cell = link.closest('.ReactVirtualized__Grid__innerScrollContainer > div');
  const names = link.closest('.ReactVirtualized__Grid');
  const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
  const values = grids[grids.indexOf(names) + 1];
  if (!cell || !values) return null;
  const cells = [...values.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
    .filter(d => d.style.top === cell.style.top)
    .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left));
  if (!cells.length) return null;
  const v = values.getBoundingClientRect(), c = cells[0].getBoundingClientRect();
  return {values: cells.map(d => d.textContent.trim()),
          visible: c.top >= v.top - 1 && c.bottom <= v.bottom + 1,
          aligned: Math.abs(c.top - cell.getBoundingClientRect().top) < 2};
})(%s)
"""

_METRICS_GRID_BOX = """
(() => {
  const link = document.querySelector('a[title="Plot chart"]');
  const names = link && link.closest('.ReactVirtualized__Grid');
  if (!names) return null;
  const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
  const values = grids[grids.indexOf(names) + 1];
  values.scrollIntoView({block: 'nearest'});  // scrolls the page (if needed), not the grid
  const r = values.getBoundingClientRect();
  return [r.left + r.width / 2, r.top + r.height / 2];
})()
"""


_FOLD = """((titles) => { let n = 0;
  for (const h of document.querySelectorAll('.du-bois-light-collapse-header[role=button]')) {
    if (titles.includes(h.textContent.trim()) && h.getAttribute('aria-expanded') === 'true') { h.click(); n++; } }
  return n; })(%s)"""


def test_mlflow_ui_lists_and_compares_greedy_and_uniform(browser, searched, tmp_path):
    cfg, out = searched
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    exp_id = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    ids = {name: out.child_run_ids[name] for name in ("uniform", "greedy")}
    expected = {name: client.get_run(rid).data.metrics["test/accuracy"] for name, rid in ids.items()}
    shots = []
    with mlflow_server(cfg.tracking.resolved_uri(), tmp_path / "server.log") as url, \
            chromium(browser, tmp_path / "profile") as page:
        # 1. the experiment's runs page: the parent run, expanded, lists uniform and greedy
        page.call("Page.navigate", url=f"{url}/#/experiments/{exp_id}/runs")
        parent_link = f"a[href$=\"/runs/{out.parent_run_id}\"]"
        assert page.wait_for(f"!!document.querySelector('{parent_link}')"), \
            "the search's parent run is not in the runs table"
        if not page.evaluate(_anchor_texts(ids["greedy"])):  # children collapsed under the parent: expand
            clicked = page.evaluate(f"""(() => {{
                const cell = document.querySelector('{parent_link}').closest('[role=gridcell]');
                const b = cell && cell.querySelector('button');
                if (!b) return false; b.click(); return true; }})()""")
            assert clicked, "no expand button next to the parent run"
        for name, rid in ids.items():
            assert page.wait_for(_anchor_texts(rid), 20) == name, f"run {name} ({rid}) is not listed"
        shots.append(page.screenshot(tmp_path / "mlflow_runs.png"))

        # 2. MLflow's compare view of the two runs shows test/accuracy of both
        runs = json.dumps([ids["uniform"], ids["greedy"]]).replace(" ", "")
        page.call("Page.navigate", url=f"{url}/#/compare-runs?runs={runs}&experiments={json.dumps([exp_id])}")
        assert page.wait_for("document.body.innerText.includes('Comparing 2 Runs')"), "compare page did not load"
        header = page.wait_for("""(() => { const t = [...document.querySelectorAll('tr, [role=row]')]
            .find(r => r.textContent.includes('Run Name')); return t ? t.innerText : null; })()""", 20)
        assert header and header.index("uniform") < header.index("greedy"), header
        # fold the plots and the parameters so the run names and the metrics share one screen
        page.evaluate(_FOLD % json.dumps(["Visualizations", "Parameters"]))
        time.sleep(0.5)
        box = page.wait_for(_METRICS_GRID_BOX, 20)
        assert box, "no metrics table on the compare page"
        row = None
        for _ in range(80):  # scroll the (virtualized) metrics table like a user until the row shows
            row = page.evaluate(_METRIC_ROW % json.dumps("test/accuracy"))
            if row and row["visible"]:
                break
            page.wheel(box[0], box[1], 90)
            time.sleep(0.15)
        assert row and row["visible"], f"test/accuracy is not shown in the compare view's metrics: {row}"
        # MLflow 3.17's compare view syncs the names column to the values column's *previous*
        # scroll position (one scroll event behind; in a desktop browser the many small events of
        # smooth scrolling hide it). Two 1-px wheel ticks bring the names back in line (1 px off).
        for dy in (1, -1):
            page.wheel(box[0], box[1], dy)
            time.sleep(0.2)
        row = page.evaluate(_METRIC_ROW % json.dumps("test/accuracy"))
        assert row and row["visible"], row
        assert row["aligned"], "the metric name and its values are not drawn on the same line"
        values = row["values"]
        assert len(values) == 2, values
        for shown, name in zip(values, ("uniform", "greedy")):
            assert float(shown) == pytest.approx(expected[name], abs=1.5e-3), (name, shown, expected[name])
        time.sleep(0.3)
        shots.append(page.screenshot(tmp_path / "mlflow_compare.png"))
    for s in shots:
        w, h = png_size(s)
        assert w >= 1000 and h >= 600
        keep(s)
