"""Evaluation reports: `report.json` (every number), `report.md`, and a self-contained `report.html` (charts as
embedded PNGs, sample thumbnails as data URIs; it opens offline), plus merging several reports into one comparison.

A report is a dict:

    {"schema": 2, "created": ..., "runs": [{"config", "environment", "timing", ...}],
     "evaluations": [{"run": 0, "checkpoint": {"name", "path", "fingerprint", "parameters", "inference"?},
                      "dataset": {"name", "source", "split", "path", "fingerprint", "n", "available", "skipped"},
                      "task", "mode", "decoding", "prompt_type", "primary",
                      "candidates": {"count", "lists", "origin", "references_listed", "n"} | None,
                      "metrics": {"definition", "scores", "counts", "groups", "confusion"?,
                                  "scorers": {name: {"definition", "scores", "counts"}}?},
                      "baselines": {"fitted_on", "rows": [{"name", "definition", "scores", "counts"}]}
                                   | {"unavailable": why},
                      "timing", "predictions_file", "samples": [{"id", "question", "prediction", "reference",
                      "correct", "thumbnail"}]}]}

Every evaluation is shown, each in one summary row (dataset and decoding mode; a checkpoint evaluated twice that way
gets a row per run); every score is printed with its definition, the other protocols' scores and the baselines
beside it. Numbers are shown with two decimals everywhere (`fmt`), so report.md and report.html carry exactly the
values of report.json rounded the same way.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from scaling.data.records import Record
from scaling.data.tasks import get_task

SCHEMA = 2
THUMBNAIL_PX = 96
FINGERPRINT_BLOCK = 4 << 20
"""Bytes hashed at each end of a large weight file: enough to tell checkpoints apart without reading gigabytes."""


def fmt(value: float) -> str:
    """How every score is printed in report.md and report.html."""
    return f"{value:.2f}"


# ---------------------------------------------------------------------------------------------------------------------
# Fingerprints and samples


def checkpoint_fingerprint(directory: str | os.PathLike) -> str:
    """sha256 over each file's name, size, and first and last 4 MiB (complete content for files below 8 MiB)."""
    digest = hashlib.sha256()
    root = Path(directory)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as file:
            digest.update(file.read(FINGERPRINT_BLOCK))
            if size > 2 * FINGERPRINT_BLOCK:
                file.seek(-FINGERPRINT_BLOCK, os.SEEK_END)
            digest.update(file.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()


def records_fingerprint(records: Sequence[Record]) -> str:
    """sha256 of what is evaluated: ids, task, text fields, references, candidates and each image's bytes."""
    digest = hashlib.sha256()
    for record in records:
        image = hashlib.sha256(record.image.read_bytes()).hexdigest() if record.image is not None else None
        row = [record.id, record.task, record.text, record.targets, record.candidates, record.answer_type, image]
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


def thumbnail_uri(record: Record, size: int = THUMBNAIL_PX) -> str | None:
    """A small JPEG of the record's image as a data URI, or None for text-only records and unreadable images."""
    if record.image is None:
        return None
    from scaling.data.images import ImageError, load_image

    try:
        image = load_image(record.image)
    except ImageError:
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def question_text(record: Record) -> str:
    """The record's input as the model reads it without instructions: its task's prompt."""
    return get_task(record.task).prompt(record).strip()


def sample_rows(records: Sequence[Record], predictions: Sequence[str], hits: Sequence[bool | None],
                limit: int, prompts: Sequence[str] | None = None) -> list[dict]:
    """The first `limit` samples for the report's table (their prompts as given, else the task's), thumbnails
    embedded."""
    rows = []
    for i, (record, prediction, hit) in enumerate(list(zip(records, predictions, hits, strict=False))[:limit]):
        rows.append({"id": record.id, "question": prompts[i] if prompts else question_text(record),
                     "prediction": prediction, "reference": record.target, "correct": hit,
                     "thumbnail": thumbnail_uri(record)})
    return rows


def write_predictions(path: str | os.PathLike, records: Sequence[Record], predictions: Sequence[str],
                      hits: Sequence[bool | None], extra: Sequence[dict] | None = None) -> Path:
    """One JSON line per sample: id, task, input, prediction, references, answer type, attributes, hit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for i, (record, prediction, hit) in enumerate(zip(records, predictions, hits, strict=True)):
            row = {"id": record.id, "task": record.task, "input": record.text, "prediction": prediction,
                   "references": record.targets, "answer_type": record.answer_type,
                   "attributes": record.attributes, "correct": hit, **(extra[i] if extra else {})}
            file.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return path


def new_report(runs: list[dict], evaluations: list[dict]) -> dict:
    """A report dict from its runs (config, environment, timing) and evaluations."""
    return {"schema": SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "runs": runs, "evaluations": evaluations}


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md and report.html into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    _atomic_write(paths["json"], json.dumps(report, indent=2, ensure_ascii=False, default=str))
    _atomic_write(paths["md"], render_markdown(report))
    _atomic_write(paths["html"], render_html(report))
    return paths


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def merge_reports(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> dict:
    """Combine several report.json files into one comparison report (runs and evaluations concatenated)."""
    runs, evaluations = [], []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no report.json there; pass report files or run directories "
                                    "written by recipes/evaluate.py")
        report = json.loads(path.read_text(encoding="utf-8"))
        if report.get("schema") != SCHEMA:
            raise ValueError(f"{path}: report schema {report.get('schema')!r}, expected {SCHEMA}; re-run the "
                             "evaluation with this version")
        offset = len(runs)
        runs += [{**run, "report": str(path)} for run in report["runs"]]
        evaluations += [{**e, "run": e["run"] + offset,
                         "predictions_file": _moved(e.get("predictions_file"), path.parent, Path(out_dir))}
                        for e in report["evaluations"]]
    _disambiguate_checkpoints(evaluations, runs)
    merged = new_report(runs, evaluations)
    write_report(merged, out_dir)
    return merged


def _moved(file: str | None, report_dir: Path, out_dir: Path) -> str | None:
    """A predictions file named relative to its report, renamed relative to the merged report's directory."""
    if not file:
        return file
    return os.path.relpath((report_dir / file).resolve(), out_dir.resolve())


def _disambiguate_checkpoints(evaluations: list[dict], runs: list[dict]) -> None:
    """Two reports that both call their model 'export' get the report's directory name added."""
    owners: dict[str, set[str | None]] = {}
    for e in evaluations:
        owners.setdefault(e["checkpoint"]["name"], set()).add(e["checkpoint"].get("fingerprint"))
    for e in evaluations:
        if len(owners[e["checkpoint"]["name"]]) > 1:
            run_dir = Path(runs[e["run"]]["report"]).parent.name
            e["checkpoint"] = {**e["checkpoint"], "name": f"{e['checkpoint']['name']} ({run_dir})"}


# ---------------------------------------------------------------------------------------------------------------------
# Tables shared by Markdown and HTML


def checkpoint_names(report: dict) -> list[str]:
    """Checkpoints in the order of their size (Base, Large, XLarge), then of appearance."""
    seen: dict[str, int] = {}
    for e in report["evaluations"]:
        seen.setdefault(e["checkpoint"]["name"], e["checkpoint"].get("parameters") or 0)
    return sorted(seen, key=lambda name: seen[name])


def dataset_names(report: dict) -> list[str]:
    return list(dict.fromkeys(e["dataset"]["name"] for e in report["evaluations"]))


def row_labels(report: dict) -> list[str]:
    """Each evaluation's summary row: "dataset (mode)", with the run (then the position) added when one checkpoint
    has several evaluations of that kind, so that no evaluation hides another."""
    evaluations = report["evaluations"]
    labels = [f"{e['dataset']['name']} ({e['mode']})" for e in evaluations]
    for detail in (lambda i, e: f"run {e['run']}", lambda i, e: f"evaluation {i}"):
        taken = Counter((e["checkpoint"]["name"], label) for e, label in zip(evaluations, labels, strict=True))
        labels = [label if taken[(e["checkpoint"]["name"], label)] == 1 else f"{label[:-1]}, {detail(i, e)})"
                  for i, (e, label) in enumerate(zip(evaluations, labels, strict=True))]
    return labels


def summary_rows(report: dict) -> dict[str, dict[str, dict]]:
    """{row label: {checkpoint name: evaluation}}, rows in order of appearance."""
    rows: dict[str, dict[str, dict]] = {}
    for label, e in zip(row_labels(report), report["evaluations"], strict=True):
        rows.setdefault(label, {})[e["checkpoint"]["name"]] = e
    return rows


def best_baseline(evaluation: dict) -> tuple[str, float] | None:
    """(name, score) of the baseline with the highest primary score, or None when there are no baselines."""
    rows = [r for r in (evaluation.get("baselines") or {}).get("rows", []) if evaluation["primary"] in r["scores"]]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["scores"][evaluation["primary"]])
    return best["name"], best["scores"][evaluation["primary"]]


def summary_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Rows: dataset and decoding mode (task, primary metric); columns: checkpoints, then the best baseline; cells:
    the primary score."""
    checkpoints = checkpoint_names(report)
    header = ["dataset (mode)", "task", "metric", *checkpoints, "best baseline"]
    rows = []
    for label, by_checkpoint in summary_rows(report).items():
        first = next(iter(by_checkpoint.values()))
        cells = [fmt(e["metrics"]["scores"][e["primary"]]) if (e := by_checkpoint.get(c)) else "–"
                 for c in checkpoints]
        baseline = best_baseline(first)
        rows.append([label, first["task"], first["primary"], *cells,
                     f"{fmt(baseline[1])} ({baseline[0]})" if baseline else "–"])
    return header, rows


def scores_table(evaluation: dict) -> tuple[list[str], list[list[str]]]:
    """Every score with its sample count and, beside it, each baseline's score on the same metric."""
    scores, counts = evaluation["metrics"]["scores"], evaluation["metrics"]["counts"]
    baselines = (evaluation.get("baselines") or {}).get("rows", [])
    header = ["metric", "score", "n", *(f"baseline: {b['name']}" for b in baselines)]
    return header, [[name, fmt(value), str(counts.get(name, "")),
                     *(fmt(b["scores"][name]) if name in b["scores"] else "" for b in baselines)]
                    for name, value in scores.items()]


def scorers_table(evaluation: dict) -> tuple[list[str], list[list[str]]]:
    """The other protocols' scores of the same predictions: scorer, metric, score, n."""
    rows = [[name, metric, fmt(value), str(scorer["counts"].get(metric, ""))]
            for name, scorer in evaluation["metrics"].get("scorers", {}).items()
            for metric, value in scorer["scores"].items()]
    return ["scorer", "metric", "score", "n"], rows


def scoring_notes(evaluation: dict) -> list[str]:
    """How the evaluation scored, in words: the definition, the candidates, the baselines, each scorer."""
    metrics = evaluation["metrics"]
    notes = [f"Scoring: {metrics.get('definition', 'not recorded')}"]
    candidates = evaluation.get("candidates")
    if candidates:
        lists = "" if candidates["lists"] == 1 else f" ({candidates['lists']} different lists)"
        notes.append(f"Candidates ({evaluation['mode']} mode): {candidates['count']} answers{lists} from "
                     f"{candidates['origin']}; {candidates['references_listed']} of {candidates['n']} references "
                     "are among them (the others cannot be predicted).")
    baselines = evaluation.get("baselines") or {}
    if "rows" in baselines:
        notes.append(f"Baselines, fitted on the {baselines['fitted_on']}, scored like the model: "
                     + "; ".join(f"{b['name']}: {b['definition']}" for b in baselines["rows"]) + ".")
    elif baselines:
        notes.append(f"Baselines: none ({baselines['unavailable']}).")
    notes += [f"Scorer {name}: {scorer['definition']}" for name, scorer in metrics.get("scorers", {}).items()]
    return notes


def group_table(groups: dict) -> tuple[list[str], list[list[str]]]:
    return ["value", "accuracy", "n"], [[value, fmt(g["accuracy"]), str(g["n"])] for value, g in groups.items()]


def confusion_table(confusion: dict) -> tuple[list[str], list[list[str]]]:
    header = ["reference \\ prediction", *confusion["columns"]]
    return header, [[row, *map(str, counts)] for row, counts in zip(confusion["rows"], confusion["matrix"],
                                                                       strict=True)]


def runs_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """One row per run (a merged report has several): where, on what, how long."""
    rows = []
    for i, run in enumerate(report["runs"]):
        env = run.get("environment", {})
        rows.append([str(i), run.get("report", "this run"), str(env.get("processes", "")),
                     str(env.get("distributed_type", "")), str(env.get("device", "")),
                     str(env.get("mixed_precision", "")), f"{run.get('timing', {}).get('total_s', 0.0):.1f}"])
    return ["run", "report", "processes", "distribution", "device", "precision", "seconds"], rows


def evaluation_title(evaluation: dict) -> str:
    return f"{evaluation['checkpoint']['name']} on {evaluation['dataset']['name']} ({evaluation['task']}, " \
           f"{evaluation['mode']})"


def settings_line(evaluation: dict) -> str:
    """Samples, source, prompt layout, decoding, speed and the fingerprints that say what exactly was evaluated."""
    d, t, c, ds = evaluation["decoding"], evaluation["timing"], evaluation["checkpoint"], evaluation["dataset"]
    decoding = ", ".join(f"{k}={v}" for k, v in d.items())
    origin = ", ".join(str(x) for x in (ds.get("source"), ds.get("split") and f"split {ds['split']}") if x)
    prompt = f"prompt_type={evaluation['prompt_type']}, " if evaluation.get("prompt_type") else ""
    return (f"{ds['n']} samples{f' ({origin})' if origin else ''}, {prompt}decoding: {decoding}; "
            f"{t['seconds']:.1f} s ({t['samples_per_s']:.2f} samples/s); checkpoint {c.get('path') or 'in memory'} "
            f"[{(c.get('fingerprint') or 'no fingerprint')[:12]}], data [{ds['fingerprint'][:12]}]")


def comparability_notes(report: dict) -> list[str]:
    """Datasets evaluated on different records under one name (other split, max_samples, data version)."""
    notes = []
    for dataset in dataset_names(report):
        prints = {e["dataset"]["fingerprint"][:12] for e in report["evaluations"] if e["dataset"]["name"] == dataset}
        if len(prints) > 1:
            notes.append(f"{dataset} was evaluated on different records in different runs (data fingerprints "
                         f"{', '.join(sorted(prints))}); its scores are not directly comparable")
    return notes


# ---------------------------------------------------------------------------------------------------------------------
# Markdown


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def render_markdown(report: dict) -> str:
    """The whole report as Markdown tables (no images)."""
    parts = ["# Evaluation report", "", f"Created {report['created']}.", "", "## Summary", "",
             _md_table(*summary_table(report)), *(f"\n**Note:** {note}" for note in comparability_notes(report))]
    parts += ["", "## Runs", "", _md_table(*runs_table(report)), "",
              "The full configuration of each run is in report.json (`runs[i].config`)."]
    for evaluation in report["evaluations"]:
        parts += ["", f"## {evaluation_title(evaluation)}", "", settings_line(evaluation), "",
                  *(f"- {note}" for note in scoring_notes(evaluation)), "", _md_table(*scores_table(evaluation))]
        if evaluation["metrics"].get("scorers"):
            parts += ["", "### Other protocols, same predictions", "", _md_table(*scorers_table(evaluation))]
        for key, groups in evaluation["metrics"].get("groups", {}).items():
            parts += ["", f"### By {key}", "", _md_table(*group_table(groups))]
        if "confusion" in evaluation["metrics"]:
            parts += ["", "### Closed (yes/no) questions", "", _md_table(*confusion_table(evaluation["metrics"]
                                                                                           ["confusion"]))]
        if evaluation.get("predictions_file"):
            parts += ["", f"Per-sample predictions: `{evaluation['predictions_file']}`"]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Charts (matplotlib Agg → PNG → data URI)


def _figure_uri(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chart_primary_scores(report: dict) -> str:
    """Grouped bars: one group per summary row, one bar per checkpoint, height = the primary score on the full
    0-100 scale (a low score looks low), the best baseline as a black line across its group."""
    plt = _pyplot()
    rows, checkpoints = summary_rows(report), checkpoint_names(report)
    width = 0.8 / len(checkpoints)
    figure, axis = plt.subplots(figsize=(max(5, 1.4 * len(rows) * len(checkpoints) ** 0.5), 3.5))
    tallest = 100.0
    for i, checkpoint in enumerate(checkpoints):
        heights = [e["metrics"]["scores"][e["primary"]] if (e := row.get(checkpoint)) else 0.0 for row in rows.values()]
        tallest = max(tallest, *heights)
        axis.bar([x + i * width for x in range(len(rows))], heights, width, label=checkpoint)
    for x, row in enumerate(rows.values()):
        baseline = best_baseline(next(iter(row.values())))
        if baseline:
            axis.hlines(baseline[1], x - width / 2, x + 0.8 - width / 2, colors="black", linestyles="--",
                        label="best baseline" if x == 0 else None)
    axis.set_ylim(0, 1.05 * tallest)  # percentages; CIDEr-D may pass 100
    axis.set_xticks([x + width * (len(checkpoints) - 1) / 2 for x in range(len(rows))])
    axis.set_xticklabels([f"{label}\n({next(iter(row.values()))['primary']})" for label, row in rows.items()],
                         fontsize=8)
    axis.set_ylabel("score")
    axis.set_title("Primary score per dataset")
    axis.legend(fontsize=8)
    return _figure_uri(figure)


def chart_checkpoints(report: dict) -> str | None:
    """Lines across checkpoints ordered by size (the Base → Large → XLarge view), one line per row and score."""
    checkpoints = checkpoint_names(report)
    if len(checkpoints) < 2:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for label, row in summary_rows(report).items():
        evaluations = [row.get(c) for c in checkpoints]
        names = next(e for e in evaluations if e)["metrics"]["scores"]
        for name in [n for n in names if n.endswith("accuracy") or n in ("rouge_l", "cider", "bleu_4")][:3]:
            values = [e["metrics"]["scores"].get(name) if e else None for e in evaluations]
            axis.plot(checkpoints, [float("nan") if v is None else v for v in values], marker="o",
                      label=f"{label}: {name}")
    axis.set_ylabel("score")
    axis.set_title("Checkpoints side by side")
    axis.legend(fontsize=7, loc="best")
    return _figure_uri(figure)


def chart_scores(evaluation: dict) -> str:
    """Bars of every score of one evaluation (overall / closed / open, or BLEU-1..4, ROUGE, CIDEr-D)."""
    plt = _pyplot()
    scores = evaluation["metrics"]["scores"]
    figure, axis = plt.subplots(figsize=(max(4.0, 0.6 * len(scores) + 1.5), 2.8))
    bars = axis.bar(list(scores), list(scores.values()), color="#55a868")
    axis.bar_label(bars, labels=[fmt(v) for v in scores.values()], fontsize=7)
    axis.set_ylim(0, 1.1 * max(100.0, *scores.values()))  # percentages; CIDEr-D may pass 100
    axis.tick_params(axis="x", labelrotation=30, labelsize=8)
    axis.set_ylabel("score")
    axis.set_title(evaluation_title(evaluation), fontsize=9)
    return _figure_uri(figure)


def chart_groups(evaluation: dict, key: str) -> str:
    """Horizontal bars of accuracy per group value, annotated with the sample count."""
    plt = _pyplot()
    groups = evaluation["metrics"]["groups"][key]
    figure, axis = plt.subplots(figsize=(5.5, 0.3 * len(groups) + 1.2))
    names = list(groups)
    axis.barh(names, [groups[n]["accuracy"] for n in names], color="#4c72b0")
    for y, name in enumerate(names):
        axis.text(groups[name]["accuracy"] + 1, y, f"n={groups[name]['n']}", va="center", fontsize=7)
    axis.set_xlim(0, 110)
    axis.invert_yaxis()
    axis.set_xlabel("accuracy")
    axis.set_title(f"{evaluation_title(evaluation)}: by {key}", fontsize=9)
    return _figure_uri(figure)


def chart_confusion(evaluation: dict) -> str:
    """The yes/no confusion matrix as a heat map with counts."""
    plt = _pyplot()
    confusion = evaluation["metrics"]["confusion"]
    figure, axis = plt.subplots(figsize=(3.6, 2.6))
    axis.imshow(confusion["matrix"], cmap="Blues")
    darkest = max(max(row) for row in confusion["matrix"]) or 1
    for r, row in enumerate(confusion["matrix"]):
        for c, count in enumerate(row):
            axis.text(c, r, str(count), ha="center", va="center", color="white" if count > darkest / 2 else "black")
    axis.set_xticks(range(len(confusion["columns"])), confusion["columns"])
    axis.set_yticks(range(len(confusion["rows"])), confusion["rows"])
    axis.set_xlabel("prediction")
    axis.set_ylabel("reference")
    axis.set_title("closed (yes/no) questions", fontsize=9)
    return _figure_uri(figure)


# ---------------------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.ok { background: #e6f4ea; } td.bad { background: #fce8e6; }
img.chart { max-width: 100%; } .settings { color: #555; font-size: 0.85rem; } .note { color: #a33; }
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(uri: str | None, alt: str, css: str = "chart") -> str:
    return f'<img class="{css}" alt="{html.escape(alt)}" src="{uri}">' if uri else ""


def _samples_html(samples: list[dict]) -> str:
    rows = []
    for s in samples:
        verdict = {True: "ok", False: "bad"}.get(s["correct"], "")
        rows.append(
            f"<tr><td>{_img(s['thumbnail'], s['id'], 'thumb')}</td><td>{html.escape(s['question'])}</td>"
            f"<td class=\"{verdict}\">{html.escape(s['prediction'])}</td><td>{html.escape(str(s['reference']))}"
            "</td></tr>")
    return ("<table><tr><th>image</th><th>input</th><th>prediction</th><th>reference</th></tr>"
            + "".join(rows) + "</table>")


def _config_html(run: dict) -> str:
    """The run's resolved configuration, folded away."""
    text = json.dumps(run.get("config", {}), indent=1, ensure_ascii=False)
    return f"<details><summary>configuration ({html.escape(run.get('report', 'this run'))})</summary>" \
           f"<pre>{html.escape(text)}</pre></details>"


def render_html(report: dict) -> str:
    """One HTML file with every table of report.md, the charts and the sample table, images as data URIs."""
    body = [f"<h1>Evaluation report</h1><p>Created {html.escape(report['created'])}.</p>", "<h2>Summary</h2>",
            _html_table(*summary_table(report)),
            *(f"<p class=\"note\">Note: {html.escape(note)}</p>" for note in comparability_notes(report)),
            _img(chart_primary_scores(report), "primary score per dataset"),
            _img(chart_checkpoints(report), "checkpoints side by side"), "<h2>Runs</h2>",
            _html_table(*runs_table(report)), *map(_config_html, report["runs"])]
    for evaluation in report["evaluations"]:
        metrics = evaluation["metrics"]
        body += [f"<h2>{html.escape(evaluation_title(evaluation))}</h2>",
                 f"<p class=\"settings\">{html.escape(settings_line(evaluation))}</p>",
                 "<ul class=\"settings\">" + "".join(f"<li>{html.escape(n)}</li>" for n in scoring_notes(evaluation))
                 + "</ul>", _html_table(*scores_table(evaluation)), _img(chart_scores(evaluation), "scores")]
        if metrics.get("scorers"):
            body += ["<h3>Other protocols, same predictions</h3>", _html_table(*scorers_table(evaluation))]
        for key, groups in metrics.get("groups", {}).items():
            body += [f"<h3>By {html.escape(key)}</h3>", _html_table(*group_table(groups)),
                     _img(chart_groups(evaluation, key), f"accuracy by {key}")]
        if "confusion" in metrics:
            body += ["<h3>Closed (yes/no) questions</h3>", _html_table(*confusion_table(metrics["confusion"])),
                     _img(chart_confusion(evaluation), "confusion matrix")]
        if evaluation.get("samples"):
            body += ["<h3>Samples</h3>", _samples_html(evaluation["samples"])]
        if evaluation.get("predictions_file"):
            link = html.escape(Path(evaluation["predictions_file"]).as_posix())
            body.append(f'<p class="settings">Per-sample predictions: <a href="{link}">{link}</a></p>')
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Evaluation report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
