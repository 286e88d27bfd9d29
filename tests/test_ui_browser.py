"""The web workbench driven in a real headless Chromium (Selenium on Debian's chromium + chromium-driver).

One board on a tiny project: every tab loads; a training started from the page shows a live loss
curve (updated at least twice), survives a page reload, and Stop ends it KILLED; a second training
finishes and its adapter appears in Compare (side by side with the base) and Inspect. The browser
runs with a dead proxy for everything but loopback and every request it makes is checked: the page
needs nothing from outside the machine. Screenshots of each tab go to <project>/outputs/ui/.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from urllib.parse import urlparse

import pytest
from conftest import TINY_TRAINING

from lora_project.paths import ProjectPaths

pytestmark = pytest.mark.slow

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def _chromium() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("browser tests need Chromium and its driver (Debian: apt-get install chromium chromium-driver); "
                    f"found browser={browser}, chromedriver={driver}")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("browser tests need selenium (pip install -r requirements.txt)")
    return browser, driver


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    # Everything but loopback goes to a closed port: the board must work with the network off.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1500",
                "--proxy-server=127.0.0.1:9", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.requested = set()
    yield d
    d.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def board(project, tracking_store, monkeypatch):
    """The board serving the tiny project on a free loopback port."""
    from lora_project.ui import launch

    (project / "config" / "training_config.yaml").write_text(
        TINY_TRAINING.replace("log_interval: 2", "log_interval: 10").replace("eval_interval: 3", "eval_interval: 0"))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(project / "outputs" / "ui" / "cache"))
    paths = ProjectPaths(project)
    app, url, jobs = launch(paths, "127.0.0.1", _free_port(), quiet=True)
    yield url, paths
    jobs.stop_all()
    app.close()


# ------------------------------------------------------------------------------------------ helpers

def _requests(d) -> set[str]:
    """URLs the browser asked for since the last call (from Chrome's DevTools log)."""
    for entry in d.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            d.requested.add(msg["params"]["request"]["url"])
    return d.requested


def _wait(d, what, fn, timeout=60.0, every=0.25):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = fn()
            if last:
                return last
        except Exception as exc:  # the element is being re-rendered: try again
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def _text(d, css) -> str:
    from selenium.webdriver.common.by import By

    return d.find_element(By.CSS_SELECTOR, css).text


def _tab(d, name):
    from selenium.webdriver.common.by import By

    _wait(d, f"tab {name}", lambda: d.find_elements(By.ID, f"tab-{name}-button"))[0].click()


def _type(d, elem_id, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = d.find_element(By.CSS_SELECTOR, f"#{elem_id} input, #{elem_id} textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    box.send_keys(Keys.TAB)


def _choose(d, elem_id, value):
    """Pick a value of a Gradio dropdown: type it, then click the matching option."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = d.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(value)
    opt = _wait(d, f"option {value} of {elem_id}", lambda: [o for o in d.find_elements(
        By.CSS_SELECTOR, f"#{elem_id} li[role=option]") if o.get_attribute("aria-label") == value])
    opt[0].click()


def _shot(d, paths, name):
    _requests(d)  # DevTools keeps a bounded log: collect as we go
    out = paths.outputs_dir / "ui"
    out.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(out / f"{name}.png"))


def _cmd(d) -> str:
    from selenium.webdriver.common.by import By

    return d.find_element(By.CSS_SELECTOR, "#train-cmd textarea, #train-cmd input").get_attribute("value") or ""


def _progress(d) -> str:
    return _text(d, "#train-progress")


def _loss_points(text: str, adapter: str) -> int:
    """Loss points of the followed run if it is `adapter`'s and RUNNING (first line of the progress text), else -1."""
    line = text.split("\n")[0]
    if not re.match(rf"RUNNING exp_\d+_{adapter}:", line) or " loss points" not in line:
        return -1
    return int(line.split(" loss points")[0].rsplit(" ", 1)[-1])


def _results(paths, adapter):
    exps = sorted(paths.experiments_dir.glob(f"exp_*_{adapter}"))
    return json.loads((exps[-1] / "results.json").read_text()) if exps and (exps[-1] / "results.json").is_file() else {}


# ------------------------------------------------------------------------------------------ the test

def test_board_in_a_real_browser(board, browser):
    from selenium.webdriver.common.by import By

    url, paths = board
    d = browser
    d.get(url)

    # Catalog: status of every row; Prepare and a sample of the text.
    _wait(d, "catalog table", lambda: "toddler_data" in _text(d, "#catalog-table"))
    _choose(d, "cat-name", "toddler_data")
    d.find_element(By.ID, "prepare-btn").click()
    _wait(d, "prepare message", lambda: "toddler_data: prepared" in _text(d, "#cat-msg"))
    row = _wait(d, "prepared row", lambda: [r for r in d.find_elements(By.CSS_SELECTOR, "#catalog-table tr")
                                            if r.get_attribute("data-name") == "toddler_data" and " yes " in r.text])
    assert (paths.processed("toddler_data") / "stats.json").is_file(), row[0].text
    _wait(d, "sample", lambda: _text(d, "#cat-sample textarea") or d.find_element(
        By.CSS_SELECTOR, "#cat-sample textarea").get_attribute("value"))
    _shot(d, paths, "catalog")

    # Train: a bad value is refused beside its field, the command line follows the form.
    _tab(d, "train")
    _wait(d, "the form's defaults", lambda: _cmd(d).startswith("lora-project train"))  # page load done
    _choose(d, "t-dataset", "toddler_data")
    _type(d, "f-training-max-steps", "-5")
    _wait(d, "error beside steps", lambda: "must be >= 0" in _text(d, "#err-training-max-steps"))
    _type(d, "f-training-max-steps", "4000")
    cmd = _wait(d, "command line", lambda: "max_steps=4000" in (v := _cmd(d)) and v)
    assert cmd.startswith("lora-project train toddler_data --set training.max_steps=4000"), cmd
    assert _text(d, "#err-training-max-steps") == ""
    d.find_element(By.CSS_SELECTOR, "#t-mlflow input").click()  # this run is only for stopping: no tracking
    _wait(d, "--no-mlflow", lambda: "--no-mlflow" in _cmd(d))
    d.find_element(By.ID, "start-btn").click()
    _wait(d, "started", lambda: "started" in _text(d, "#train-msg"), timeout=20)
    # A second adapter trains at the same time (one training per adapter, not per board) and finishes.
    d.find_element(By.CSS_SELECTOR, "#t-mlflow input").click()
    _type(d, "t-adapter", "tiny_done")
    _type(d, "f-training-max-steps", "20")
    _wait(d, "second command line", lambda: "--adapter-name tiny_done" in (v := _cmd(d)) and "--no-mlflow" not in v)
    d.find_element(By.ID, "start-btn").click()
    _wait(d, "second start", lambda: "started" in _text(d, "#train-msg") and "tiny_done" in _text(d, "#train-msg"))
    _type(d, "t-adapter", "")  # the page follows the adapter the form names: toddler_data again
    # The loss curve grows while the run trains: at least two updates after the first point.
    seen = set()
    _wait(d, "three loss-curve states", lambda: seen.add(_loss_points(_progress(d), "toddler_data")) or
          len(seen - {-1, 0}) >= 3, timeout=90)
    line = _wait(d, "loss line", lambda: d.find_elements(By.CSS_SELECTOR, "#loss-plot .mark-line path"))
    assert (line[0].get_attribute("d") or "").count("L") >= 2, "the loss curve is not a drawn line"
    assert "linear scale" in d.find_element(By.CSS_SELECTOR, "#loss-plot g.role-axis[aria-label]").get_attribute("aria-label")
    _wait(d, "second run FINISHED", lambda: _results(paths, "tiny_done").get("status") == "FINISHED", timeout=90)
    # A reload (or a second tab) shows the same live run: its state lives in the experiment folder.
    d.refresh()
    _tab(d, "train")
    live = _wait(d, "live run after reload", lambda: _loss_points(_progress(d), "toddler_data") > 0 and _progress(d))
    assert _loss_points(live, "toddler_data") >= max(seen), live
    d.find_element(By.ID, "stop-btn").click()
    _wait(d, "KILLED", lambda: re.match(r"KILLED exp_\d+_toddler_data", _progress(d)), timeout=60)
    assert _results(paths, "toddler_data")["status"] == "KILLED"
    runs = _text(d, "#runs-table")
    assert "KILLED" in runs and "FINISHED" in runs, runs
    # The curve no longer changes, so it is not redrawn: a stable screenshot.
    _wait(d, "the plot's legend", lambda: d.find_elements(By.CSS_SELECTOR, "#loss-plot .role-legend"))
    time.sleep(1.5)
    _shot(d, paths, "train")
    run_id = _results(paths, "tiny_done")["mlflow_run_id"]
    assert run_id and run_id in runs and "mlflow ui" in _text(d, "#mlflow-hint")

    # Compare: the base and the new adapter side by side.
    _tab(d, "compare")
    box = _wait(d, "adapter checkbox", lambda: [c for c in d.find_elements(By.CSS_SELECTOR, "#cmp-adapters label")
                                                 if "tiny_done_lora" in c.text])
    box[0].click()
    d.find_element(By.ID, "gen-btn").click()
    cols = _wait(d, "two finished columns", lambda: (c := d.find_elements(By.CSS_SELECTOR, "#cmp-out .cmp-col"))
                 and len(c) == 2 and "generating" not in " ".join(x.text for x in c) and c, timeout=60)
    assert [c.get_attribute("data-model") for c in cols] == ["base", "tiny_done_lora"]
    assert all(c.text.split("\n", 1)[1].startswith("the dog") for c in cols), [c.text for c in cols]
    _shot(d, paths, "compare")

    # Evaluate: a sampled adapters x datasets evaluation, saved and shown.
    _tab(d, "evaluate")
    _wait(d, "evaluate tab", lambda: "no saved matrix yet" in _text(d, "#ev-matrix-msg"))
    _type(d, "ev-tokens", "100")
    d.find_element(By.ID, "ev-btn").click()
    table = _wait(d, "matrix", lambda: (t := _text(d, "#matrix-table")) and "tiny_done_lora" in t and t, timeout=60)
    assert "base" in table and "toddler_data" in table
    assert list(paths.metrics_dir.glob("matrix_*.json"))
    _shot(d, paths, "evaluate")

    # Inspect: the adapter list, its heatmap and spectra.
    _tab(d, "inspect")
    _wait(d, "adapter table", lambda: "tiny_done_lora" in _text(d, "#inspect-table"))
    _choose(d, "in-one", "tiny_done_lora")
    d.find_element(By.ID, "in-btn").click()
    _wait(d, "weights images", lambda: len(d.find_elements(By.CSS_SELECTOR, "#in-heat img, #in-spec img")) == 2)
    assert "modules" in _text(d, "#in-msg")
    _shot(d, paths, "inspect")

    # Gradio's file route serves none of the project's files, nor any other.
    import urllib.error
    import urllib.request

    for target in ("/etc/passwd", str(paths.training_config), "config/training_config.yaml", "../../etc/passwd"):
        try:
            code = urllib.request.urlopen(f"{url.rstrip('/')}/gradio_api/file={target}", timeout=10).status
        except urllib.error.HTTPError as exc:
            code = exc.code
        assert code in (403, 404), (target, code)

    outside = sorted(u for u in _requests(d) if urlparse(u).scheme in ("http", "https", "ws", "wss")
                     and urlparse(u).hostname not in ("127.0.0.1", "localhost", "::1"))
    assert not outside, f"the page asked for resources outside the machine: {outside[:5]}"
    assert len(d.requested) > 10  # the log did capture the page's requests
