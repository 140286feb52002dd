"""report.html of evaluate and audit, opened in a real headless browser (Debian's chromium): it loads without a console
error, its tables and images are there, a click on a header sorts, and a screenshot is not blank. Without chromium
these tests skip, unless EXPLAINER_REQUIRE_BROWSER=1 (.ci/run installs chromium and sets it): then they fail."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _helpers import colour_classifier
from PIL import Image
from test_evaluate import CLASSES, OracleExplainer, _with_boxes, run_toy, toy_batch

from explainer.audit import Audit, write_audit
from explainer.evaluate import write_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("EXPLAINER_REQUIRE_BROWSER") == "1":
            pytest.fail("EXPLAINER_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install -y chromium)")
        pytest.skip("no chromium (apt-get install -y chromium; .ci/run installs it and makes these tests mandatory)")
    return path


def browse(chromium: str, page: Path, tmp: Path, *args: str) -> tuple[str, str]:
    """(stdout, stderr) of one headless chromium run on a local file, in a fresh profile, no network."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    done = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr


def console_errors(stderr: str) -> list[str]:
    """Chromium's console lines for uncaught exceptions and console.error (logged as CONSOLE with --v=0)."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "ERROR" in line
                                                                          or "error" in line.lower())]


def check_page(chromium: str, page: Path, tmp: Path, tables: int, screenshot: bool = True) -> str:
    """Loads with no console error, holds `tables` tables and only embedded images, renders something."""
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched from a network
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', text))
    dom, stderr = browse(chromium, page, tmp, "--dump-dom")
    assert not console_errors(stderr), console_errors(stderr)
    assert dom.count("<table") == tables and dom.count("<img") >= 1
    if screenshot:
        shot = tmp / f"{page.stem}.png"
        browse(chromium, page, tmp, f"--screenshot={shot}", "--window-size=1200,900")
        pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
        assert pixels.std() > 5 and (pixels < 128).mean() > 0.005  # text, tables and figures, not an empty page
    return dom


def test_evaluate_and_audit_pages_in_a_real_browser(chromium, tmp_path):
    ev, res = run_toy(["explainer", "gradcam"], figure_images=3)
    res["settings"] = {"checkpoint": "x.pt", "classifier": "c.pt", "manifest": "m.json", "split": "test",
                       "world_size": 1, "device": "cpu", "date": "today", "batch_size": 4}
    write_outputs(res, ev, tmp_path / "eval")
    # tables: segmentation, class-specific, classification, timing, faithfulness, localization (the W&B ones)
    dom = check_page(chromium, tmp_path / "eval" / "report.html", tmp_path, tables=6)
    assert "per-class galleries" in dom and "<h3>red</h3>" in dom and "<h3>green</h3>" in dom

    audit = Audit(colour_classifier(gain=40), OracleExplainer(), CLASSES)
    for seed in range(2):
        audit.update(_with_boxes(toy_batch(seed)))
    res = audit.finish()
    res["settings"] = {"checkpoint": "x.pt", "split": "test"}
    write_audit(res, audit, tmp_path / "audit", top=2)
    # the audit page with two clicks on "class" appended: the page's own script sorts, the second click descending
    page = (tmp_path / "audit" / "report.html").read_text()
    clicker = ("<script>var th=[...document.querySelectorAll('th')].find(h=>h.textContent==='class');"
               "th.click();th.click();</script></body>")
    (tmp_path / "audit" / "clicked.html").write_text(page.replace("</body>", clicker))
    dom = check_page(chromium, tmp_path / "audit" / "clicked.html", tmp_path, tables=1, screenshot=False)
    assert dom.count("<img") == 2 and "classes by reliance on context" in dom
    order = re.findall(r"<tr><td>\d+</td><td>(\w+)</td>", dom)
    assert order == sorted(CLASSES, reverse=True) and 'class="desc"' in dom


def test_console_errors_are_seen(chromium, tmp_path):
    """The check above can fail: a page whose script throws is caught."""
    (tmp_path / "bad.html").write_text("<html><body><table></table><script>notDefined();</script></body></html>")
    _, stderr = browse(chromium, tmp_path / "bad.html", tmp_path, "--dump-dom")
    assert console_errors(stderr)


def test_pages_without_a_browser(tmp_path):
    """What the page holds, checked without chromium: every figure embedded, a table per W&B table."""
    ev, res = run_toy(["explainer"], figure_images=2)
    res["settings"] = {}
    write_outputs(res, ev, tmp_path)
    text = (tmp_path / "report.html").read_text()
    assert text.count('<table class="sortable">') == 6 and text.count("data:image/png;base64,") >= 3
    assert "Localization" in (tmp_path / "report.md").read_text() and "localization" in text
