"""MILE's component × method sweep as data and as a table: the default grid, one row of the table per trained policy,
and the table written as JSON / CSV / Markdown plus a plot of accuracy against the trainable share.

    table = [{"label": label, **table_row(cfg, counts, memory, scores, loss, seconds)} for ...]
    write_table(table, out_dir)          # peft_sweep.{json,csv,md,png}
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from scaling.config import Config

DEFAULT_GRID = [
    "T-T-T",  # full fine-tuning, the reference row
    # Table 1: LoRA (r = 4 and 8)
    "F-LoRA-LoRA:4", "F-LoRA-LoRA:8", "LoRA-LoRA-LoRA:4", "LoRA-LoRA-LoRA:8", "F-T-LoRA:4", "T-T-LoRA:4",
    "T-LoRA-LoRA:4",
    # Table 2: (IA)3
    "F-IA3-IA3", "IA3-IA3-IA3", "F-T-IA3", "T-IA3-IA3",
    # Table 3: prefix tuning
    "F-F-Prefix", "F-Prefix-Prefix", "T-Prefix-Prefix", "T-T-Prefix",
    # Table 4: P-tuning v2
    "F-F-PTv2", "F-PTv2-PTv2",
]
COLUMNS = ["ViT", "JTM", "Dec", "rank", "quantize", "params_pct", "trainable", "memory_mib", "opened", "closed",
           "yes_no", "global", "final_loss", "seconds"]
SHORT = {"freeze": "F", "full": "T", "lora": "LoRA", "dora": "DoRA", "ia3": "IA3", "prefix": "Prefix", "ptv2": "PTv2"}


def table_row(cfg: Config, counts: dict, memory: int, scores: dict, loss: float | None, seconds: float) -> dict:
    """One line of MILE's table; with several VQA test sets their accuracies are averaged."""
    def score(name: str) -> float | None:
        values = [v for k, v in scores.items() if k.endswith("/" + name)]
        return sum(values) / len(values) if values else None

    peft = cfg.peft
    adapted = {peft.vision, peft.encoder, peft.decoder}
    return {
        "ViT": SHORT[peft.vision], "JTM": SHORT[peft.encoder], "Dec": SHORT[peft.decoder],
        "rank": peft.r if adapted & {"lora", "dora"} else None,
        "quantize": None if peft.quantize == "none" else peft.quantize,
        "params_pct": counts["all"]["trainable_pct"], "trainable": counts["all"]["trainable"],
        "memory_mib": memory / 2**20,
        "opened": score("open_accuracy"), "closed": score("closed_accuracy"), "yes_no": score("yes_no_accuracy"),
        "global": score("accuracy"), "final_loss": loss, "seconds": seconds,
    }


def write_table(rows: list[dict], out_dir: Path) -> dict[str, Path]:
    """peft_sweep.json / .csv / .md / .png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"peft_sweep.{ext}" for ext in ("json", "csv", "md", "png")}
    paths["json"].write_text(json.dumps(rows, indent=2))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["label", *COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    paths["md"].write_text(markdown_table(rows))
    plot_accuracy(rows, paths["png"])
    return paths


def markdown_table(rows: list[dict]) -> str:
    """MILE's layout: ViT | JTM | Dec | rank | #Params % | Memory | Opened | Closed | Global (+ yes/no, loss)."""
    def fmt(value, digits=2):
        return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    head = ("| ViT | JTM | Dec | Rank | #Params (%) | Memory (MiB) | Opened | Closed | Global | Yes/No | Final loss |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = [f"| {r['ViT']} | {r['JTM']} | {r['Dec']}{' (' + r['quantize'] + ')' if r['quantize'] else ''} | "
             f"{fmt(r['rank'])} | {fmt(r['params_pct'], 3)} | {fmt(r['memory_mib'], 0)} | {fmt(r['opened'])} | "
             f"{fmt(r['closed'])} | {fmt(r['global'])} | {fmt(r['yes_no'])} | {fmt(r['final_loss'], 3)} |"
             for r in rows]
    return head + "\n".join(lines) + "\n"


def plot_accuracy(rows: list[dict], path: Path) -> None:
    """Global accuracy against trainable % (log scale), one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row["global"] is None:
            continue
        ax.scatter(row["params_pct"], row["global"], s=24)
        ax.annotate(row["label"], (row["params_pct"], row["global"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_ylim(0, 100)  # the full scale: a flat sweep must look flat
    ax.set_xlabel("trainable parameters (% of all, adapters included)")
    ax.set_ylabel("global VQA accuracy (%)")
    ax.set_title("PEFT policy per component: accuracy vs. trainable share")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
