"""The sweep's HTML pages as a reader sees them: a real tiny sweep, each page opened in headless Chromium.

Chromium (Debian's `chromium`) is installed by `make test` where it is missing; without it these tests
are skipped and say why. Each page is loaded with a small script appended that records, after the
load event, the title, the rendered text (innerText: what a reader sees), how many images there are
and how many loaded, and the page's width in a 1,400 px window.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tongue_nb.pipeline import render, sweep

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (make test installs "
                                                         "Debian's chromium where apt-get can)")
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const pre = document.createElement('pre');
  pre.id = 'tnb-probe';
  pre.textContent = JSON.stringify({title: document.title, text: document.body.innerText, images: imgs.length,
    loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    width: document.documentElement.scrollWidth});
  document.body.appendChild(pre);
});
</script>"""
LOG_LINE = re.compile(r"\b\d\d:\d\d:\d\d\b.*\b(INFO|WARNING|DEBUG)\b")


def read_page(page: Path, screenshot: Path | None = None) -> dict:
    """What Chromium shows of a page: title, visible text, images (total, loaded), width at 1,400 px."""
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
            "--virtual-time-budget=10000"]
    try:
        out = subprocess.run(args + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
        if screenshot is not None:
            subprocess.run(args + [f"--screenshot={screenshot}", page.as_uri()], capture_output=True, timeout=120)
    finally:
        probe.unlink()
    found = re.search(r'<pre id="tnb-probe">(.*?)</pre>', out, re.S)
    assert found, f"{page.name}: the page did not finish loading in Chromium"
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, dict]:
    from tongue_nb.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("pages")
    data = make_synthetic(root / "data", n=60, size=48, seed=1)
    recipe = root / "tiny.yaml"
    recipe.write_text("pretrained: false\nimage_size: 32\nbatch_size: 8\nstage1_epochs: 1\nstage2_epochs: 1\n"
                      "num_threads: 1\nearly_stopping_patience: 0\n")
    reports = root / "reports"
    result = sweep.run_sweep(data, ["test_convnext", "test_vit"], params_file=recipe, out_dir=root / "sweep",
                             reports_dir=reports, compare=True, compare_steps=4, ensemble_k=2,
                             compare_options={"image_size": 32, "batch_size": 4, "isolate": False, "num_threads": 1})
    assert result.ok, result.describe()
    shots = root / "screenshots"
    shots.mkdir()
    return {p.name: read_page(p, shots / f"{p.stem}.png") for p in sorted(reports.glob("*.html"))}


def test_every_page_says_what_it_is_and_shows_no_logs_or_raw_dicts(pages):
    assert {"index.html", "01_data_review.html", "02_model_comparison.html", "03_train-test_convnext.html",
            "04_error_analysis-test_vit.html", "05_report.html"} <= set(pages)
    for name, page in pages.items():
        want = render.page_title(name) if name != "index.html" else "tongue_nb sweep"
        assert want in page["title"], (name, page["title"])
        assert page["text"].lstrip().startswith(page["title"]), (name, page["text"][:80])  # first heading
        assert not LOG_LINE.search(page["text"]), (name, LOG_LINE.search(page["text"]).group(0))
        assert "{'" not in page["text"] and "'none'" not in page["text"], name
        assert page["images"] == page["loaded"], (name, page)
        assert page["width"] <= 1400, (name, page["width"])  # wide tables scroll inside the page, not the page
        if name != "index.html":
            assert "all reports" in page["text"], name


def test_figures_show_and_the_reader_gets_the_verdict_and_references(pages):
    for name in ("03_train-test_convnext.html", "04_error_analysis-test_vit.html", "05_report.html"):
        assert pages[name]["images"] >= 3, (name, pages[name]["images"])
    final = pages["05_report.html"]["text"]
    assert "Best single run on the combined test score" in final and "Always giving the constant answer scores" in final
    assert "chance: constant answer" in final and "classical-baseline" in final and "per-task selection" in final
    index = pages["index.html"]["text"]
    for row in ("test_convnext", "test_vit", "classical-baseline", "ensemble(top 2)", "per-task selection",
                "chance: constant answer", "chance: random guess"):
        assert row in index, row
    assert "built-in synthetic set" not in index  # this sweep named its own dataset folder
    assert "Data:" in index and "recipe:" in index and "95% interval" in index
    training = pages["03_train-test_convnext.html"]["text"]
    assert "initial weights" in training and "ROC and precision-recall" in training
