"""reports/index.html: the sweep's front page (provenance, links to every report, the score rows, failures)."""
from __future__ import annotations

import html
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from tongue_nb import runfiles
from tongue_nb.fonts import CSS_CJK
from tongue_nb.analysis.runs import SweepData
from tongue_nb.analysis.stats import bootstrap_table
from tongue_nb.analysis.tables import run_table
from tongue_nb.runfiles import RunFileError

log = logging.getLogger(__name__)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,""" + CSS_CJK + """,sans-serif;margin:2rem auto;max-width:60rem;
color:#222;padding:0 1rem}h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{border:1px solid #ddd;padding:.35rem .5rem;text-align:left;
vertical-align:top}th{background:#f4f4f4}a{color:#1a5fb4}.fail{color:#a51d2d;font-weight:600}.ok{color:#26a269}
code,pre{font-size:.8rem;white-space:pre-wrap;margin:0}.muted{color:#777}"""
PAGE_CSS = _CSS  # the style of the project's hand-written pages (the index, a tune's report)


def _link(reports_dir: Path, target: str | Path | None, text: str) -> str:
    """A relative link when the target exists, a grey 'missing' note otherwise."""
    if target and Path(target).exists():
        rel = Path(target).resolve().relative_to(reports_dir.resolve()) if Path(target).resolve().is_relative_to(reports_dir.resolve()) else Path(target).resolve()
        return f'<a href="{html.escape(rel.as_posix())}">{html.escape(text)}</a>'
    return f'<span class="muted">{html.escape(text)} (not produced)</span>'


def sweep_provenance(sweep: SweepData) -> str:
    """One line: the dataset (and whether it is the built-in synthetic set), recipe, split sizes, start, commit."""
    info: dict[str, Any] = {}
    try:
        info = runfiles.read_json(sweep.path / "sweep.json", "the sweep's record of its options (JSON object)")
    except RunFileError as exc:  # the provenance line says '?' where the record is missing or damaged
        log.warning("%s", exc)
    data = str(info.get("data_dir") or "?")
    synthetic = Path(data, ".synthetic.json").is_file()
    parts = [f"Data: {data}" + (" (the built-in synthetic set, not real photos)" if synthetic else "")]
    parts.append(f"recipe: {info.get('params_file') or '(per-backbone defaults)'}")
    run = next((r for r in sweep.runs.values() if r.summary.get("counts") and "seed" in r.summary), None)
    if run is not None:
        c = run.summary["counts"]
        if sweep.cv:
            parts.append(f"{run.summary.get('folds')}-fold cross-validation (seed {run.summary.get('seed', '?')}): "
                         f"{c['val']['samples']} images out-of-fold, {c['test']['samples']} test images set aside")
        else:
            parts.append(f"split (seed {run.summary.get('seed', '?')}): "
                         + ", ".join(f"{c[s]['samples']} {s}" for s in ("train", "val", "test") if s in c) + " images")
    trained = {name: r.summary for name, r in sweep.runs.items() if "image_size" in r.summary and "best_epoch" in r.summary}
    sizes = sorted({int(sm["image_size"]) for sm in trained.values()})
    if sizes:
        parts.append("image size " + " / ".join(f"{v} px" for v in sizes))
    pre = sorted(name for name, sm in trained.items() if (sm.get("pretrained") or {}).get("kind", "none") != "none")
    if trained:
        parts.append(f"pretrained: {', '.join(pre)}; the others from random weights" if pre
                     else "every run from random weights")
    if info.get("started"):
        parts.append(f"started {info['started']}")
    commit = _git_commit()
    if commit:
        parts.append(f"commit {commit}")
    return "; ".join(parts) + "."


def _git_commit() -> str:
    """Short commit of the package's checkout ('' when not in git)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def index_rows(sweep: SweepData, ensemble_k: int = 3, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """The index page's score rows: runs, the baseline, combinations and chance, with 95% intervals.

    The same table as the final report's (run_table with selection and chance rows; bootstrap_table's
    intervals with the same resamples), so the two pages count and rank alike.
    """
    if not sweep.runs:
        return []
    many = len(sweep.runs) >= 2
    table = run_table(sweep, ensemble_k if many else 0, selection=many, chance=True)
    boot = bootstrap_table(sweep, n_boot=n_boot, seed=seed).set_index("run")
    rows = []
    for rec in table.to_dict("records"):
        name = str(rec["run"])
        kind = ("reference" if name.startswith("chance:") else "combination" if name not in sweep.runs
                else "baseline" if "baseline" in name else "run")
        row = {"backbone": name, "kind": kind, "weights": rec.get("weights") if kind in ("run", "baseline") else None,
               "combined_thresholded": rec.get("combined_thresholded")}
        if name in boot.index:
            row["ci"] = (boot.loc[name, "combined_lo"], boot.loc[name, "combined_hi"])
        rows.append(row)
    return rows


def _training_links(reports_dir: Path, run: dict) -> str:
    """The row's training page, or its folds' pages (a fold ensemble)."""
    if run.get("reports"):
        return " ".join(_link(reports_dir, page, name) if page else html.escape(name) for name, page in run["reports"])
    return _link(reports_dir, run.get("report"), "training") if run.get("report") else ""


def _cv_section(cv: Any, verdict: str) -> list[str]:
    """The cross-validation table of the index: per backbone the folds, mean +- sd over folds, and the corrected
    resampled t-test against the best."""
    def num(x: Any) -> str:
        return f"{x:.3f}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"

    parts = [f"<h2>Cross-validation</h2><p>{html.escape(verdict)}</p>",
             "<table><tr><th>backbone</th><th>folds</th><th>combined, mean over folds</th><th>sd</th>"
             "<th>fold ensemble on test</th><th>difference to the best</th><th>95% interval (corrected t-test)</th>"
             "<th>p</th></tr>"]
    for rec in cv.to_dict("records"):
        best = rec["vs_best"] == "(best)"
        p = rec.get("p_value")
        parts.append(f"<tr><td>{html.escape(str(rec['backbone']))}</td><td>{int(rec['folds'])}</td>"
                     f"<td>{num(rec['combined_mean'])}</td><td>{num(rec['combined_sd'])}</td>"
                     f"<td>{num(rec['test_combined'])}</td><td>{'(best)' if best else num(rec['diff'])}</td>"
                     f"<td>{'' if best else num(rec['diff_lo']) + ' to ' + num(rec['diff_hi'])}</td>"
                     f"<td>{'' if best or p is None else num(p)}</td></tr>")
    parts.append("</table>")
    return parts


def write_index(reports_dir: str | Path, runs: Sequence[dict], failures: Sequence[dict], comparison: str | Path | None = None,
                data_review: str | Path | None = None, title: str = "tongue_nb sweep", extra: Sequence[tuple[str, str | Path]] = (),
                provenance: str = "", selection: str | Path | None = None, cv: Any = None, cv_verdict: str = "") -> Path:
    """Write reports/index.html: links to the reports, every score row (runs, baseline, combinations, chance), failures.

    runs: dicts with backbone, combined_thresholded, and optionally kind (run/baseline/combination/
    reference), weights, ci (low, high), report and error_analysis paths (a fold ensemble: `reports`, its folds'
    (name, page) pairs). selection: the sweep's saved per-task selection, named with the commands that apply it
    to new photos. cv and cv_verdict: a cross-validated sweep's cv.cv_table and cv.cv_verdict.
    """
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    data_review = data_review or reports_dir / "01_data_review.html"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if provenance:
        parts.append(f"<p>{html.escape(provenance)}</p>")
    parts += ["<h2>Reports</h2><ul>",
              f"<li>{_link(reports_dir, comparison, 'Final report: comparison of every run')}</li>",
              f"<li>{_link(reports_dir, data_review, 'Data review')}</li>"]
    parts += [f"<li>{_link(reports_dir, path, text)}</li>" for text, path in extra]
    parts.append("</ul>")
    if cv is not None and len(cv):
        parts += _cv_section(cv, cv_verdict)
    tuned = "all out-of-fold images (a run row is a fold ensemble)" if cv is not None and len(cv) else "validation"
    parts.append(f"<h2>Scores</h2><p>Combined macro-F1 on the test split, thresholds tuned on {tuned}, best "
                 "first; 95% bootstrap intervals over the test images of one seed. <em>reference</em> rows need no "
                 "model; <em>combination</em> rows combine runs and are never one of them.</p>"
                 "<table><tr><th>run</th><th>kind</th><th>initial weights</th><th>combined (thresholded)</th>"
                 "<th>95% interval</th><th>training report</th><th>error analysis</th></tr>")
    for run in runs:
        score = run.get("combined_thresholded")
        score_text = f"{score:.3f}" if isinstance(score, (int, float)) and math.isfinite(score) else "-"
        ci = run.get("ci")
        ci_text = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                          for v in ci) else ""
        weights = run.get("weights")
        weights_text = "" if weights is None or (isinstance(weights, float) and math.isnan(weights)) else str(weights)
        parts.append(f"<tr><td>{html.escape(str(run['backbone']))}</td><td>{html.escape(str(run.get('kind', 'run')))}"
                     f"</td><td>{html.escape(weights_text)}</td><td>{score_text}</td><td>{ci_text}</td>"
                     f"<td>{_training_links(reports_dir, run)}</td>"
                     f"<td>{_link(reports_dir, run.get('error_analysis'), 'errors') if run.get('error_analysis') else ''}"
                     "</td></tr>")
    parts.append("</table>")
    if selection is not None:
        where = html.escape(str(Path(selection).resolve()))
        parts.append(f"<p>The per-task selection is saved as <code>{where}</code>; to apply it to new photos: "
                     f"<code>tongue-nb predict --selection {where} --images PHOTOS --out predictions.csv</code>, or "
                     f"<code>notebooks/06_predict.ipynb</code> with <code>-p selection {where}</code>.</p>")
    parts.append(f"<h2>Failed runs ({len(failures)})</h2>")
    if failures:
        parts.append("<table><tr><th>run</th><th>error</th><th>message</th><th>cell</th><th>partial notebook</th></tr>")
        for f in failures:
            cell = "" if f.get("cell_index") is None else f"cell {f['cell_index']}"
            source = f.get("cell_source") or ""
            parts.append(f"<tr><td>{html.escape(str(f['backbone']))}</td><td class='fail'>{html.escape(str(f['error_type']))}</td>"
                         f"<td><pre>{html.escape(str(f['message']))}</pre></td><td>{html.escape(cell)}"
                         f"{'<pre>' + html.escape(source) + '</pre>' if source else ''}</td>"
                         f"<td>{_link(reports_dir, f.get('report'), 'partial report')}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class='ok'>none</p>")
    parts.append("</body></html>")
    path = reports_dir / "index.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)  # atomic: a browser never sees half an index
    return path
