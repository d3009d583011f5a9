"""The replication report of a PEFT sweep: each row beside MILE's published numbers, the seed noise measured on
repeated rows, and for each of MILE's findings a verdict measured on this run.

    report = replication(table, cfg, failed)          # dict: setting, noise, separation, findings, rows
    paths = write_replication(table, cfg, out_dir)    # replication.json / .md / .html (plots embedded)

A verdict is "reproduced" when this run shows the effect MILE reports by more than twice the seed noise
(EFFECT_MARGIN), "not reproduced" when the rows it needs were measured and the effect is absent (within that margin)
or reversed, and "inconclusive" (with the reason) when a row it needs is missing or failed, or no row was repeated to
measure the noise. MILE's own numbers go through the same rules (with zero noise), so each finding shows what the
published tables say too.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scaling.config import Config, Decoding
from scaling.sweep import (
    GLOBAL_FINE_TUNING,
    METRIC_NOTE,
    MILE_SOURCE,
    MILE_TABLES,
    ORIGIN_TABLES,
    SHORT,
    Row,
    fmt,
    grid_labels,
    published,
)

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
PEFT_METHODS = ("lora", "prefix", "ia3", "ptv2")


# ---------------------------------------------------------------------------------------------------------------------
# Seed noise and separation


EFFECT_MARGIN = 2.0
"""An effect counts when it is larger than this multiple of the measured seed noise."""


def seed_noise(table: list[dict]) -> dict:
    """|Δ Global| between each /seedN repeat and its first-seed row; the noise is the largest, floored at one test
    question (100 / n), so identical results never make every difference count."""
    by_label = {r["label"]: r for r in table}
    pairs = []
    for result in table:
        row = Row.parse(result["label"])
        first = by_label.get(row.first_seed_label)
        if row.seed > 1 and first is not None and None not in (first["global"], result["global"]):
            pairs.append({"row": row.first_seed_label, "seed_1": first["global"], f"seed_{row.seed}": result["global"],
                          "delta": abs(result["global"] - first["global"])})
    if not pairs:
        return {"pairs": [], "points": None, "margin": None}
    one_question = max(100.0 / max(r["n_closed"] + r["n_opened"], 1) for r in table)
    points = max(one_question, *(p["delta"] for p in pairs))
    # the difference of two rows carries the noise of both, and a few repeats under-estimate the spread
    return {"pairs": pairs, "points": points, "margin": EFFECT_MARGIN * points}


def separation(table: list[dict], noise: float | None) -> dict:
    """How many pairs of distinct (first-seed) rows differ in Global by more than the noise margin."""
    values = [r["global"] for r in first_seed_rows(table) if r["global"] is not None]
    pairs = [(a, b) for i, a in enumerate(values) for b in values[i + 1:]]
    separated = None if noise is None else sum(abs(a - b) > noise for a, b in pairs)
    return {"rows": len(values), "pairs": len(pairs), "separated": separated,
            "spread": (max(values) - min(values)) if values else None}


def first_seed_rows(table: list[dict]) -> list[dict]:
    return [r for r in table if Row.parse(r["label"]).seed == 1]


# ---------------------------------------------------------------------------------------------------------------------
# Findings


@dataclass(frozen=True)
class Finding:
    """One of MILE's claims, how it is checked on a table of rows, and which published tables show it."""

    key: str
    claim: str
    check: Callable[[dict[str, dict], float], tuple[str, str]]
    """(rows by label, noise) -> (verdict, evidence)."""
    mile_tables: tuple[str, ...] = ()
    """The MILE tables whose published numbers the same check is run on (empty: none are available)."""


def _compare(diff: float, noise: float) -> str:
    """'above' when the difference is larger than the noise, 'below' when smaller than -noise, else 'within'."""
    return "above" if diff > noise else "below" if diff < -noise else "within"


def _rows_with(rows: dict[str, dict], **policy) -> list[dict]:
    """Origin-data, first-seed rows whose components follow `policy` (e.g. vision="full", encoder="full")."""
    found = []
    for label, result in rows.items():
        row = Row.parse(label)
        if row.data == "origin" and row.seed == 1 and all(row.policy[k] == v for k, v in policy.items()):
            found.append(result)
    return found


def check_frozen_vision(rows: dict[str, dict], noise: float) -> tuple[str, str]:
    """(a) every row with a frozen vision encoder scores below the same row with the vision encoder trained."""
    gaps = []
    for frozen in _rows_with(rows, vision="freeze"):
        policy = {**Row.parse(frozen["label"]).policy, "vision": "full"}
        trained = [r for r in _rows_with(rows, vision="full") if Row.parse(r["label"]).policy == policy]
        gaps += [(frozen, t, t["global"] - frozen["global"]) for t in trained]
    if not gaps:
        return INCONCLUSIVE, "no pair of rows that differ only in a frozen vs trained vision encoder"
    evidence = "; ".join(f"{f['label']} {fmt(f['global'])} vs {t['label']} {fmt(t['global'])} ({g:+.2f})"
                         for f, t, g in gaps)
    verdict = REPRODUCED if all(_compare(g, noise) == "above" for _, _, g in gaps) else NOT_REPRODUCED
    return verdict, evidence


def check_peft_matches_global(rows: dict[str, dict], noise: float) -> tuple[str, str]:
    """(b) some T-T-<PEFT> row is within the noise of global fine-tuning (or above it) with fewer trainable
    parameters."""
    reference = rows.get(GLOBAL_FINE_TUNING)
    candidates = [r for r in _rows_with(rows, vision="full", encoder="full") if r["label"] != GLOBAL_FINE_TUNING]
    if reference is None or not candidates:
        return INCONCLUSIVE, f"needs {GLOBAL_FINE_TUNING} and at least one T-T-<PEFT> row"
    best = max(candidates, key=lambda r: r["global"])
    saving = 100.0 * (1 - best["params_pct"] / reference["params_pct"])
    evidence = (f"best {best['label']} {fmt(best['global'])} at {fmt(best['params_pct'])}% trainable vs "
                f"{GLOBAL_FINE_TUNING} {fmt(reference['global'])} at {fmt(reference['params_pct'])}% "
                f"({saving:.0f}% fewer trainable parameters)")
    matches = _compare(best["global"] - reference["global"], noise) != "below" and saving > 0
    return (REPRODUCED if matches else NOT_REPRODUCED), evidence


def check_method_order(rows: dict[str, dict], noise: float) -> tuple[str, str]:
    """(c) among T-T-<method> rows: LoRA >= Prefix (within the noise), both above IA3 and PTV2 by more than it."""
    best = {}
    for method in PEFT_METHODS:
        found = _rows_with(rows, vision="full", encoder="full", decoder=method)
        if found:
            best[method] = max(found, key=lambda r: r["global"])
    if len(best) < len(PEFT_METHODS):
        missing = [f"T-T-{SHORT[m]}" for m in PEFT_METHODS if m not in best]
        return INCONCLUSIVE, f"needs a T-T-<method> row for every method; missing {', '.join(missing)}"
    value = {m: r["global"] for m, r in best.items()}
    evidence = ", ".join(f"{best[m]['label']} {fmt(value[m])} ({fmt(best[m]['params_pct'])}%)" for m in PEFT_METHODS)
    lora_vs_prefix = _compare(value["lora"] - value["prefix"], noise) != "below"
    above_rest = _compare(min(value["lora"], value["prefix"]) - max(value["ia3"], value["ptv2"]), noise) == "above"
    return (REPRODUCED if lora_vs_prefix and above_rest else NOT_REPRODUCED), evidence


def _data_effect(rows: dict[str, dict], noise: float, better: str, worse: str) -> tuple[str, str]:
    """Whether row `better` beats row `worse` by more than the noise."""
    if better not in rows or worse not in rows:
        return INCONCLUSIVE, f"needs rows {better} and {worse}"
    diff = rows[better]["global"] - rows[worse]["global"]
    evidence = f"{better} {fmt(rows[better]['global'])} vs {worse} {fmt(rows[worse]['global'])} ({diff:+.2f})"
    return (REPRODUCED if _compare(diff, noise) == "above" else NOT_REPRODUCED), evidence


def check_instruction_alone(rows: dict[str, dict], noise: float) -> tuple[str, str]:
    """(d) global fine-tuning on instruction-format data alone scores below the same on the original data."""
    return _data_effect(rows, noise, GLOBAL_FINE_TUNING, f"{GLOBAL_FINE_TUNING}/instruction")


def check_instruction_after_origin(rows: dict[str, dict], noise: float) -> tuple[str, str]:
    """(e) instruction tuning after global fine-tuning on the original data adds accuracy."""
    return _data_effect(rows, noise, f"{GLOBAL_FINE_TUNING}/origin+instruction", GLOBAL_FINE_TUNING)


FINDINGS = [
    Finding("a", "A frozen vision encoder cripples accuracy (F-*-* rows far below T-*-*).", check_frozen_vision,
            ORIGIN_TABLES),
    Finding("b", "T-T-<PEFT> matches global fine-tuning with ~40% fewer trainable parameters.",
            check_peft_matches_global, ("mile_table8",)),
    Finding("c", "LoRA ≥ Prefix > IA3, PTV2 at similar budgets (T-T-<method>).", check_method_order, ORIGIN_TABLES),
    Finding("d", "Instruction-format data alone is worse than the original data (global fine-tuning).",
            check_instruction_alone),
    Finding("e", "Instruction tuning after fine-tuning on the original data adds accuracy.",
            check_instruction_after_origin),
]


def published_rows(tables: tuple[str, ...]) -> dict[str, dict]:
    """MILE's published rows of `tables` as rows of a table, for the findings' checks."""
    return {label: {"label": label, "global": p.overall, "params_pct": p.params_pct}
            for name in tables for label, p in MILE_TABLES[name].items()}


def judge(finding: Finding, table: list[dict], noise: float | None, failed: list[str]) -> dict:
    """The verdict of one finding on this run, beside the numbers MILE published for it."""
    rows = {r["label"]: r for r in table if r["global"] is not None}
    mile = "the paper's Tables 5-7 (instruction-format data) are not in MILE's repository"
    if finding.mile_tables:
        names = ", ".join(MILE_TABLES[t][next(iter(MILE_TABLES[t]))].table for t in finding.mile_tables)
        mile = f"{names}: {finding.check(published_rows(finding.mile_tables), 0.0)[1]}"
    verdict, evidence = finding.check(rows, noise or 0.0)
    if verdict != INCONCLUSIVE and noise is None:
        verdict, evidence = INCONCLUSIVE, f"seed noise not measured (set peft.sweep_repeat); {evidence}"
    if failed and verdict == INCONCLUSIVE:
        evidence += f" (failed rows: {', '.join(failed)})"
    return {"key": finding.key, "claim": finding.claim, "verdict": verdict, "evidence": evidence, "mile": mile}


# ---------------------------------------------------------------------------------------------------------------------
# The report


def replication(table: list[dict], cfg: Config, failed: list[str] = ()) -> dict:
    """Every number of the replication report."""
    noise = seed_noise(table)
    grid = "custom" if cfg.peft.sweep else cfg.peft.grid
    rows = []
    for result in table:
        mile = published(grid, Row.parse(result["label"]))
        rows.append({**result, "mile": None if mile is None else {"citation": mile.citation, **vars(mile)}})
    return {
        "setting": setting(cfg, grid, len(table)), "source": MILE_SOURCE, "metrics": METRIC_NOTE,
        "noise": noise, "separation": separation(table, noise["margin"]),
        "findings": [judge(f, table, noise["margin"], list(failed)) for f in FINDINGS],
        "rows": rows, "failed": list(failed), "planned": grid_labels(cfg.peft),
    }


def setting(cfg: Config, grid: str, n_rows: int) -> dict:
    decoding = cfg.eval.decoding(Decoding()) if cfg.eval.mode != "auto" else None
    return {"grid": grid, "rows": n_rows, "model": cfg.model.checkpoint or f"preset {cfg.model.preset}",
            "data": [s.label or s.name for s in cfg.data.sources] or ["embedded synthetic"],
            "steps_per_row": cfg.train.max_steps, "pretrain_steps": cfg.peft.sweep_pretrain_steps,
            "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "seed": cfg.train.seed,
            "decoding": decoding.as_dict() if decoding else "auto (each task's BiomedGPT decoding)"}


NOTES = (
    "MILE adapted MISS (a BLIP-style ViT / JTM encoder / decoder) on SLAKE; these rows adapt BiomedGPT (OFA): its "
    "'ViT' is the ResNet + image projection, its 'JTM' the text-image encoder.",
    "OFA ties the decoder's token embedding and output projection to the encoder's embedding. When the encoder and "
    "decoder policies differ (F-T-LoRA, T-T-<PEFT>, ...), the decoder gets its own copy for the run, which follows the "
    "decoder's policy, as MISS's decoder has its own embedding; #Params then counts both copies.",
    "Prefix / P-tuning v2 prepend 10 virtual keys and values to every self-attention layer of the component, without "
    "position bias and without shifting the real tokens' positions (MILE's BLIP shifted them by the prefix length).",
    "Memory: MILE reports GPU memory in GB for batch 20 at 480 px; here it is the figure named in the table, for this "
    "run's batch and resolution: compare the ordering of rows, not the values.",
)


def document(report: dict) -> list[dict]:
    """The report as sections (title, paragraphs, table) that both renderers draw."""
    s = report["setting"]
    sep, noise = report["separation"], report["noise"]
    findings = [[f["key"], f["claim"], f["mile"], f["evidence"], f["verdict"]] for f in report["findings"]]
    noise_rows = [[p["row"], fmt(p["seed_1"]), fmt(next(v for k, v in p.items() if k.startswith("seed_") and
                                                      k != "seed_1")), fmt(p["delta"])] for p in noise["pairs"]]
    noise_text = ("not measured: no row was repeated (peft.sweep_repeat)" if noise["points"] is None else
                  f"{fmt(noise['points'])} points (largest seed-to-seed difference in Global); an effect counts when "
                  f"it exceeds twice that, {fmt(noise['margin'])} points (a difference of two rows carries the noise "
                  f"of both, and a few repeats under-estimate the spread); {sep['separated']} of {sep['pairs']} pairs "
                  f"of rows differ by more; Global spans {fmt(sep['spread'])} points")
    return [
        {"title": "Setting", "text": [
            f"Grid {s['grid']}: {s['rows']} rows, {s['steps_per_row']} steps each (batch {s['batch_size']}, lr "
            f"{s['lr']}, seed {s['seed']}), after {s['pretrain_steps']} steps of pretraining on the other tasks; "
            f"model {s['model']}; data {', '.join(s['data'])}; decoding {s['decoding']}.",
            f"MILE's numbers: {report['source']}.", report["metrics"]]},
        {"title": "Findings", "table": (["", "MILE's finding", "MILE's tables", "This run", "Verdict"], findings)},
        {"title": "Seed noise", "text": [noise_text],
         "table": (["Row", "Global, seed 1", "Global, seed 2", "|Δ|"], noise_rows) if noise_rows else None},
        {"title": "Rows beside MILE", "table": side_by_side(report["rows"])},
        {"title": "Failed rows", "text": [", ".join(report["failed"])]} if report["failed"] else None,
        {"title": "Differences from MILE's setting", "text": list(NOTES)},
    ]


def side_by_side(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["Row", "MILE table", "#Params % (MILE)", "#Params % (ours)", "Memory GB (MILE)", "Memory MiB (ours)",
              "Opened (MILE)", "Opened (ours)", "Closed (MILE)", "Closed (ours)", "Global (MILE)", "Global (ours)",
              "Open / Closed, answer_type (ours)"]
    lines = []
    for r in rows:
        m = r["mile"] or {}
        lines.append([r["label"], m.get("citation", "–"), fmt(m.get("params_pct"), 3), fmt(r["params_pct"], 3),
                      fmt(m.get("memory_gb")), fmt(r["memory_mib"], 0), fmt(m.get("opened")), fmt(r["opened"]),
                      fmt(m.get("closed")), fmt(r["closed"]), fmt(m.get("overall")), fmt(r["global"]),
                      f"{fmt(r['answer_type_open'])} / {fmt(r['answer_type_closed'])}"])
    return header, lines


def render_markdown(report: dict) -> str:
    out = ["# Replication of MILE's PEFT study (arXiv 2403.06407)"]
    for section in filter(None, document(report)):
        out += [f"## {section['title']}", *section.get("text", [])]
        if section.get("table"):
            header, lines = section["table"]
            out.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                                  *("| " + " | ".join(line) + " |" for line in lines)]))
    out.append("Plots: replication.html.")
    return "\n\n".join(out) + "\n"


def render_html(report: dict) -> str:
    body = ["<h1>Replication of MILE's PEFT study (arXiv 2403.06407)</h1>"]
    for section in filter(None, document(report)):
        body.append(f"<h2>{html.escape(section['title'])}</h2>")
        body += [f"<p>{html.escape(text)}</p>" for text in section.get("text", [])]
        if section.get("table"):
            header, lines = section["table"]
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td class=\"{verdict_class(c)}\">{html.escape(c)}</td>" for c in line) + "</tr>"
                for line in lines) + "</table>")
        if section["title"] == "Rows beside MILE":
            body += [f'<img alt="{alt}" src="{uri}">' for alt, uri in plots(report)]
    style = ("body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;color:#222}"
             "table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0 1rem}"
             "th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}"
             "th{background:#f3f3f3}.reproduced{background:#e6f4ea}.not-reproduced{background:#fce8e6}"
             ".inconclusive{background:#fff4d6}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>MILE replication</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def verdict_class(cell: str) -> str:
    return cell.replace(" ", "-") if cell in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE) else ""


def plots(report: dict) -> list[tuple[str, str]]:
    """Global against trainable share (ours and MILE's), and Global per row side by side, as PNG data URIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["global"] is not None]
    scatter, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:
        ax.scatter(r["params_pct"], r["global"], color="tab:blue", s=22)
        ax.annotate(r["label"], (r["params_pct"], r["global"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if r["mile"] and r["mile"]["overall"] is not None:
            ax.scatter(r["mile"]["params_pct"], r["mile"]["overall"], color="tab:orange", marker="s", s=22)
    ax.scatter([], [], color="tab:blue", label="this run")
    ax.scatter([], [], color="tab:orange", marker="s", label="MILE (published)")
    ax.set(xscale="log", ylim=(0, 100), xlabel="trainable parameters (% of all)", ylabel="Global accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    bars, bx = plt.subplots(figsize=(max(6.0, 0.5 * len(rows)), 4))
    x = range(len(rows))
    bx.bar([i - 0.2 for i in x], [r["global"] for r in rows], 0.4, label="this run")
    bx.bar([i + 0.2 for i in x], [(r["mile"] or {}).get("overall") or 0.0 for r in rows], 0.4, label="MILE")
    bx.set_xticks(list(x), [r["label"] for r in rows], rotation=60, ha="right", fontsize=7)
    bx.set(ylim=(0, 100), ylabel="Global accuracy (%)")
    bx.legend(fontsize=8)
    return [("Global vs trainable share", _png_uri(scatter)), ("Global per row", _png_uri(bars))]


def _png_uri(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_replication(table: list[dict], cfg: Config, out_dir: Path, failed: list[str] = ()) -> dict[str, Path]:
    """replication.json / .md / .html in out_dir."""
    report = replication(table, cfg, failed)
    paths = {ext: Path(out_dir) / f"replication.{ext}" for ext in ("json", "md", "html")}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["md"].write_text(render_markdown(report))
    paths["html"].write_text(render_html(report))
    return paths
