"""The sweep's HTML pages as a reader sees them: a real tiny sweep, each page opened in headless Chromium.

Chromium (Debian's `chromium`) is installed by `make test` where it is missing; without it these tests
are skipped and say why. Each page is loaded with a small script appended that records, after the
load event, the title, the rendered text (innerText: what a reader sees), how many images there are
and how many loaded, and the page's width in a 1,400 px window.
"""
from __future__ import annotations

import html
import json
import os
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
CHINESE = {"shape": "舌形", "spots": "点刺", "cracks": "裂纹", "teethmarks": "齿痕", "coat": "舌苔", "greasy": "腻苔",
           "rotten": "腐苔", "nospecialgreasy": "白苔"}
LOG_LINE = re.compile(r"\b\d\d:\d\d:\d\d\b.*\b(INFO|WARNING|DEBUG)\b")


def font_env(folder: Path, cjk: bool = True) -> dict[str, str]:
    """Chromium's environment with a fontconfig file that adds (cjk) the Noto Sans CJK of manimgx-fonts-cjk to
    the system's fonts, or leaves the system's alone (a machine without a CJK font); no root needed."""
    from tongue_nb.fonts import collection_path

    conf = folder / f"fonts-{'cjk' if cjk else 'plain'}.conf"
    extra = f"<dir>{collection_path().parent}</dir>" if cjk and collection_path() else ""
    conf.write_text(f'<?xml version="1.0"?><fontconfig><include ignore_missing="yes">/etc/fonts/fonts.conf</include>'
                    f"{extra}<cachedir>{folder / 'fc-cache'}</cachedir></fontconfig>", encoding="utf-8")
    return {**os.environ, "FONTCONFIG_FILE": str(conf)}


def read_page(page: Path, screenshot: Path | None = None, cjk: bool = True, height: int = 1000) -> dict:
    """What Chromium shows of a page: title, visible text, images (total, loaded), width at 1,400 px."""
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size=1400,{height}",
            "--virtual-time-budget=10000"]
    env = font_env(page.parent, cjk)
    try:
        out = subprocess.run(args + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120,
                             env=env).stdout
        if screenshot is not None:
            subprocess.run(args + [f"--screenshot={screenshot}", page.as_uri()], capture_output=True, timeout=120,
                           env=env)
    finally:
        probe.unlink()
    found = re.search(r'<pre id="tnb-probe">(.*?)</pre>', out, re.S)
    assert found, f"{page.name}: the page did not finish loading in Chromium"
    return json.loads(html.unescape(found.group(1)))


def chinese_names(data: Path) -> Path:
    """The synthetic dataset with Chinese task and class names (tasks.yaml and labels.csv); returns it."""
    for name in ("tasks.yaml", "labels.csv"):
        text = (data / name).read_text(encoding="utf-8")
        for latin, chinese in CHINESE.items():
            text = re.sub(rf"\b{latin}\b", chinese, text)
        (data / name).write_text(text, encoding="utf-8")
    return data


@pytest.fixture(scope="module")
def pages_root(tmp_path_factory) -> Path:
    """A tiny sweep over the synthetic set named in Chinese (its tasks and classes), its pages in reports/."""
    from tongue_nb.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("pages")
    data = chinese_names(make_synthetic(root / "data", n=60, size=48, seed=1))
    recipe = root / "tiny.yaml"
    recipe.write_text("pretrained: false\nimage_size: 32\nbatch_size: 8\nstage1_epochs: 1\nstage2_epochs: 1\n"
                      "num_threads: 1\nearly_stopping_patience: 0\n")
    reports = root / "reports"
    result = sweep.run_sweep(data, ["test_convnext", "test_vit"], params_file=recipe, out_dir=root / "sweep",
                             reports_dir=reports, compare=True, compare_steps=4, ensemble_k=2,
                             compare_options={"image_size": 32, "batch_size": 4, "isolate": False, "num_threads": 1})
    assert result.ok, result.describe()
    return root


@pytest.fixture(scope="module")
def pages(pages_root) -> dict[str, dict]:
    root, reports = pages_root, pages_root / "reports"
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
        assert not re.search(r"^'[^'\n]*'$", page["text"], re.M), (name, "a str shown as its repr, in quotes")
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


def test_chinese_names_are_drawn_in_every_figure_and_shown_on_the_pages(pages_root, pages):
    """No notebook of the sweep warns of a glyph missing from matplotlib's fonts, and the pages show the names in
    Chromium: the screenshot with the CJK font differs from the one without it where the names stand (with
    empty boxes, tofu, both would be the same)."""
    for nb in (pages_root / "sweep").rglob("*.ipynb"):
        text = nb.read_text(encoding="utf-8")
        assert "missing from font" not in text and "Glyph" not in text, nb.name
    review = pages["01_data_review.html"]["text"]
    assert all(name in review for name in CHINESE.values()), review[:500]
    assert "舌苔" in pages["05_report.html"]["text"] and "白苔" in pages["03_train-test_convnext.html"]["text"]
    page = pages_root / "reports" / "01_data_review.html"
    shots = {cjk: pages_root / f"review-{cjk}.png" for cjk in (True, False)}
    for cjk, shot in shots.items():
        read_page(page, shot, cjk=cjk, height=3000)
    assert shots[True].read_bytes() != shots[False].read_bytes(), "the names look the same without the CJK font"
