"""MILE's component × method study as data: its tables (rows and published numbers), the named grids, the row
labels, each row's run config, and the table of a finished sweep (JSON / CSV / Markdown / plot).

    rows = grid_rows(cfg.peft)                        # a Row per label: policy, rank, data format, seed
    row_cfg = row_config(cfg, rows[0])                # the config the row's own process trains with
    result = table_row(row_cfg, counts, memory, scores, loss, seconds)
    write_table(results, out_dir)                     # peft_sweep.{json,csv,md,png}

A label reads VISION-ENCODER-DECODER (F = freeze, T = full, or a method), then optionally `:RANK`, `@nf4`/`@int8`,
`/instruction` or `/origin+instruction` (the training data: MILE's instruction-format data, or global fine-tuning on
the original data followed by instruction tuning) and `/seedN` (train.seed + N - 1).

MILE's published numbers are transcribed from the tables of its repository README (TIMMY-CHAN/MILE at commit
34e00c5, "Experiment Results": Tables 1-4 for MISS on SLAKE, and the BiomedGPT-Tiny table, which is the paper's
Table 8). Tables 5-7 of the paper (instruction-format data) are not in the repository: their grids run here, their
published numbers are missing from this module.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scaling.config import Config, ConfigError, PeftArgs, PeftMethod

if TYPE_CHECKING:
    from scaling.data.loading import SourceSplit

# ---------------------------------------------------------------------------------------------------------------------
# Row labels

ALIASES = {"f": "freeze", "t": "full"}
SHORT = {"freeze": "F", "full": "T", "lora": "LoRA", "dora": "DoRA", "ia3": "IA3", "prefix": "Prefix", "ptv2": "PTv2"}
DATA_FORMATS = ("origin", "instruction", "origin+instruction")
PRETRAIN = "pretrain"
"""peft.sweep_row of the process that trains the common starting model."""
GLOBAL_FINE_TUNING = "T-T-T"


@dataclass(frozen=True)
class Row:
    """One row of a sweep: a per-component policy trained on one data format with one seed."""

    label: str
    policy: dict
    """PeftArgs fields: vision, encoder, decoder, and r / quantize when the label sets them."""
    data: str = "origin"
    seed: int = 1
    """1 = train.seed, 2 = train.seed + 1, ..."""

    @classmethod
    def parse(cls, label: str) -> Row:
        """'F-LoRA-LoRA:8@nf4/instruction/seed2' -> vision=freeze, encoder=lora, decoder=lora, r=8, quantize=nf4."""
        head, *suffixes = [part.strip() for part in label.split("/")]
        head, _, quantize = head.partition("@")
        head, _, rank = head.partition(":")
        parts = [ALIASES.get(p.strip().lower(), p.strip().lower()) for p in head.split("-")]
        methods = typing.get_args(PeftMethod)
        if len(parts) != 3 or any(p not in methods for p in parts):
            raise ValueError(f"row {label!r} must read VISION-ENCODER-DECODER with each one of F, T, "
                             f"{', '.join(methods)} (then optionally ':RANK', '@nf4' or '@int8', '/instruction' or "
                             "'/origin+instruction', '/seedN'), e.g. F-LoRA-LoRA:4")
        policy: dict = dict(zip(("vision", "encoder", "decoder"), parts, strict=True))
        if rank:
            if not rank.isdigit() or int(rank) < 1:
                raise ValueError(f"row {label!r}: the rank after ':' must be a positive integer")
            policy["r"] = int(rank)
        if quantize:
            if quantize not in ("nf4", "int8"):
                raise ValueError(f"row {label!r}: quantisation after '@' must be nf4 or int8")
            policy["quantize"] = quantize
        data, seed = "origin", 1
        for suffix in suffixes:
            if suffix in DATA_FORMATS:
                data = suffix
            elif suffix.startswith("seed") and suffix[4:].isdigit() and int(suffix[4:]) >= 1:
                seed = int(suffix[4:])
            else:
                raise ValueError(f"row {label!r}: unknown suffix '/{suffix}'; use /{', /'.join(DATA_FORMATS)} or "
                                 "/seedN (N >= 1)")
        return cls(label, policy, data, seed)

    @property
    def policy_label(self) -> str:
        """The label without data format and seed, e.g. 'T-T-LoRA:4'."""
        return self.label.split("/")[0].strip()

    @property
    def first_seed_label(self) -> str:
        """The label of the same row with train.seed (what a /seedN repeat is compared with)."""
        return "/".join(p for p in self.label.split("/") if not p.strip().startswith("seed"))

    @property
    def slug(self) -> str:
        """The row's directory name under <output_dir>/rows."""
        return self.label.replace(":", "_r").replace("@", "_").replace("/", "_").replace("+", "_then_")

    def with_seed(self, seed: int) -> Row:
        return Row.parse(self.first_seed_label + (f"/seed{seed}" if seed > 1 else ""))

    @property
    def start_row(self) -> Row | None:
        """The row whose model this one starts from: origin+instruction tunes global fine-tuning's (same seed)."""
        return Row.parse(GLOBAL_FINE_TUNING).with_seed(self.seed) if self.data == "origin+instruction" else None


# ---------------------------------------------------------------------------------------------------------------------
# MILE's tables: rows and published numbers


@dataclass(frozen=True)
class Published:
    """One row of a MILE table as published: #Params (% of all parameters), GPU memory (GB), VQA accuracies (%)."""

    table: str
    row: int
    params_pct: float | None
    memory_gb: float | None
    opened: float | None
    closed: float | None
    overall: float | None

    @property
    def citation(self) -> str:
        return f"MILE {self.table}, row {self.row}"


def _table(name: str, rows: dict[str, tuple]) -> dict[str, Published]:
    return {label: Published(name, i, *values) for i, (label, values) in enumerate(rows.items(), start=1)}


MILE_SOURCE = "TIMMY-CHAN/MILE README.md at commit 34e00c5 (Experiment Results)"
MILE_TABLES: dict[str, dict[str, Published]] = {
    # (#Params %, memory GB, Opened, Closed, Global); MISS on SLAKE, test accuracy
    "mile_table1": _table("Table 1 (MILE-LoRA)", {
        "F-LoRA-LoRA:4": (0.163, 5.19, 3.57, 50.70, 20.34),
        "F-LoRA-LoRA:8": (0.325, 5.21, 3.57, 50.70, 20.34),
        "LoRA-LoRA-LoRA:4": (0.327, 26.63, 48.65, 50.70, 49.34),
        "LoRA-LoRA-LoRA:8": (0.652, 26.75, 48.93, 50.70, 49.57),
        "F-T-LoRA:4": (38.022, 7.26, 47.76, 70.70, 55.53),
        "F-T-LoRA:8": (38.072, 7.45, 50.21, 70.99, 57.18),
        "T-LoRA-LoRA:4": (24.009, 26.96, 68.14, 50.70, 62.29),
        "T-LoRA-LoRA:8": (24.133, 27.29, 68.28, 50.70, 62.38),
        "T-T-LoRA:4": (61.887, 27.60, 78.52, 79.44, 78.83),
        "T-T-LoRA:8": (61.919, 28.11, 78.66, 80.56, 79.30),
    }),
    "mile_table2": _table("Table 2 (MILE-Prefix)", {
        "F-F-Prefix": (3.926, 4.62, 0.0, 50.7, 17.3),
        "F-Prefix-Prefix": (7.556, 4.67, 0.0, 50.7, 17.3),
        "T-Prefix-Prefix": (29.636, 26.41, 41.50, 32.95, 38.61),
        "T-T-Prefix": (63.354, 27.97, 76.82, 82.25, 78.65),
    }),
    "mile_table3": _table("Table 3 (MILE-IA3)", {
        "F-IA3-IA3": (0.051, 6.35, 0.0, 1.69, 0.57),
        "IA3-IA3-IA3": (0.061, 23.01, 0.0, 50.70, 16.98),
        "T-IA3-IA3": (23.924, 26.83, 12.77, 28.17, 17.92),
        "F-T-IA3": (37.987, 7.52, 46.24, 50.70, 47.74),
        "T-T-IA3": (61.866, 27.90, 72.20, 47.04, 63.77),
    }),
    "mile_table4": _table("Table 4 (MILE-PTV2)", {
        "F-PTv2-PTv2": (0.102, 4.52, 0.0, 0.0, 0.0),
        "F-F-PTv2": (0.051, 4.57, 7.10, 0.0, 4.72),
        "T-PTv2-PTv2": (23.963, 25.41, 13.62, 29.30, 18.87),
        "T-T-PTv2": (61.876, 27.46, 74.18, 49.86, 66.04),
    }),
    # the README's "Table 5: Extensive Results of BiomedGPT-Tiny" (the paper's Table 8); no memory column, rank unstated
    "mile_table8": _table("Table 8 (BiomedGPT-Tiny; README Table 5)", {
        "T-T-T": (100.0, None, 71.84, 64.46, 68.97),
        "T-T-LoRA": (50.76, None, 66.82, 63.48, 65.52),
        "T-T-Prefix": (51.05, None, 69.94, 60.54, 66.29),
        "T-T-IA3": (50.49, None, 64.95, 52.21, 60.01),
        "T-T-PTv2": (50.92, None, 68.07, 48.78, 60.57),
    }),
}
ORIGIN_TABLES = ("mile_table1", "mile_table2", "mile_table3", "mile_table4")
"""MILE's tables on the original data (MISS on SLAKE)."""
TABLES_1_4_ROWS = [label for name in ORIGIN_TABLES for label in MILE_TABLES[name]]

GRIDS: dict[str, list[str]] = {
    **{name: list(rows) for name, rows in MILE_TABLES.items()},
    "mile_tables1_4": [GLOBAL_FINE_TUNING, *TABLES_1_4_ROWS],
    # global fine-tuning on the original data, on MILE's instruction-format data, and on both in turn
    "mile_table5": [GLOBAL_FINE_TUNING, f"{GLOBAL_FINE_TUNING}/instruction", f"{GLOBAL_FINE_TUNING}/origin+instruction"],
    "mile_tables6_7": [f"{label}/instruction" for label in [GLOBAL_FINE_TUNING, *TABLES_1_4_ROWS]],
    # The CPU replication: the rows findings (a)-(e) of the report need, at a budget that fits 2 cores
    "proxy": [GLOBAL_FINE_TUNING, "F-T-LoRA:4", "T-T-LoRA:4", "T-T-Prefix", "T-T-IA3", "T-T-PTv2",
              f"{GLOBAL_FINE_TUNING}/instruction", f"{GLOBAL_FINE_TUNING}/origin+instruction"],
}
"""Named grids (peft.grid). Rows of the same policy keep MILE's table order."""
GRID_TABLES = {**{name: (name,) for name in MILE_TABLES}, "mile_table5": (), "mile_tables6_7": ()}
"""Which published tables a grid's rows are compared with: a MILE table its own, the others (mile_tables1_4, proxy,
explicit rows) Tables 1-4."""


def published(grid: str, row: Row) -> Published | None:
    """MILE's published numbers for `row` in the tables `grid` replicates (None: MILE published none)."""
    if row.data != "origin":
        return None
    for name in GRID_TABLES.get(grid, ORIGIN_TABLES):
        found = MILE_TABLES.get(name, {}).get(row.policy_label)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------------------------------
# A sweep's rows and their configs


def grid_labels(peft: PeftArgs) -> list[str]:
    """peft.sweep, else the grid peft.grid; then those of its rows peft.sweep_repeat names again with the second seed
    (a repeat of a row the grid does not hold is left out, so a config's repeats suit a smaller peft.sweep)."""
    labels = list(peft.sweep or GRIDS.get(peft.grid, []))
    return labels + [Row.parse(label).with_seed(2).label for label in peft.sweep_repeat if label in labels]


def grid_rows(peft: PeftArgs) -> list[Row]:
    return [Row.parse(label) for label in grid_labels(peft)]


def grid_problems(peft: PeftArgs) -> list[str]:
    """Every problem of the sweep keys: unknown grid, unreadable labels, duplicates, missing prerequisite rows."""
    if not peft.sweep and peft.grid not in GRIDS:
        return [f"peft.grid={peft.grid!r} is not a grid; choose from {', '.join(GRIDS)} or list rows in peft.sweep"]
    out, rows = [], []
    for key, labels in (("sweep", peft.sweep), ("sweep_repeat", peft.sweep_repeat)):
        for label in labels:
            try:
                rows.append(Row.parse(label))
            except ValueError as err:
                out.append(f"peft.{key}: {err}")
    if out:
        return out
    rows = grid_rows(peft)
    slugs = [r.slug for r in rows]
    out += [f"peft.sweep: row {r.label!r} appears twice (or as a /seed2 repeat of itself)" for i, r in enumerate(rows)
            if r.slug in slugs[:i]]
    labels = [r.label for r in rows]
    for i, row in enumerate(rows):
        if row.start_row and row.start_row.label not in labels[:i]:
            out.append(f"peft.sweep: row {row.label!r} instruction-tunes the model of row {row.start_row.label!r} "
                       "(global fine-tuning on the original data); put that row before it")
    if peft.sweep_row not in (None, PRETRAIN, *labels):
        out.append(f"peft.sweep_row={peft.sweep_row!r} is not a row of this sweep ({', '.join(labels)}) nor "
                   f"{PRETRAIN!r}")
    return out


def pretrained_dir(out_dir: Path) -> Path:
    return out_dir / PRETRAIN / "model"


def tokenizer_dir(out_dir: Path) -> Path:
    """Where the sweep's own process trains the one tokenizer of all its processes (build_tokenizer's run directory
    tokenizer) when neither model.tokenizer nor model.checkpoint is set."""
    from scaling.training.checkpoint import TOKENIZER_DIR

    return out_dir / TOKENIZER_DIR


def row_dir(out_dir: Path, row: Row) -> Path:
    return out_dir / "rows" / row.slug


def row_threads(cfg: Config) -> int | None:
    """Intra-op threads of each row process when peft.sweep_processes run at once: train.cpu_threads, else the cores
    shared among them; None (the process decides) with one at a time."""
    if cfg.peft.sweep_processes == 1:
        return None
    return cfg.train.cpu_threads or max(1, len(os.sched_getaffinity(0)) // cfg.peft.sweep_processes)


def shared_model_args(cfg: Config, out_dir: Path) -> dict:
    """model.tokenizer for every process of the sweep (the one it trained, unless the config names one)."""
    if cfg.model.tokenizer or cfg.model.checkpoint:
        return {}
    return {"tokenizer": str(tokenizer_dir(out_dir))}


def pretrain_config(cfg: Config) -> Config:
    """Full fine-tuning for peft.sweep_pretrain_steps on the non-VQA sources, into <output_dir>/pretrain."""
    out_dir = Path(cfg.train.output_dir)
    peft = dataclasses.replace(cfg.peft, vision="full", encoder="full", decoder="full", quantize="none",
                               sweep_row=PRETRAIN)
    steps = cfg.peft.sweep_pretrain_steps
    train = dataclasses.replace(cfg.train, output_dir=str(out_dir / PRETRAIN), max_steps=steps, save_every=steps + 1)
    data = dataclasses.replace(cfg.data, instruction=False)
    model = dataclasses.replace(cfg.model, **shared_model_args(cfg, out_dir))
    return dataclasses.replace(cfg, model=model, data=data, train=train, peft=peft)


def row_config(cfg: Config, row: Row) -> Config:
    """The config of `row`'s own process: its policy, data format, seed and directory; no step checkpoints; it starts
    from the pretrained model (or, for origin+instruction, from the global fine-tuning row's model)."""
    from scaling.data.loading import synthetic_seed

    out_dir = Path(cfg.train.output_dir)
    model = dataclasses.replace(cfg.model, **shared_model_args(cfg, out_dir))
    if row.start_row:
        model = dataclasses.replace(model, checkpoint=str(row_dir(out_dir, row.start_row) / "model"))
    elif cfg.peft.sweep_pretrain_steps:
        model = dataclasses.replace(model, checkpoint=str(pretrained_dir(out_dir)))
    peft = dataclasses.replace(cfg.peft, **row.policy, sweep_row=row.label)
    steps = cfg.train.max_steps
    train = dataclasses.replace(cfg.train, output_dir=str(row_dir(out_dir, row)), seed=cfg.train.seed + row.seed - 1,
                                save_every=steps + 1)
    # a /seedN repeat trains on the same data: its difference from the first seed is the training noise alone
    data = dataclasses.replace(cfg.data, instruction=row.data != "origin", synthetic_seed=synthetic_seed(cfg))
    return dataclasses.replace(cfg, model=model, data=data, train=train, peft=peft)


@dataclass
class SweepData:
    """Every training source (the tokenizer's corpus), the VQA ones every row trains and is scored on, and the
    others, on which the common starting model is pretrained."""

    train: list[SourceSplit]
    vqa_train: list[SourceSplit]
    vqa_test: list[SourceSplit]
    pretrain: list[SourceSplit]


def sweep_data(cfg: Config, accelerator) -> SweepData:
    """Load every training source and split them into the VQA sources (rows) and the rest (pretraining).

    Pretraining on the other tasks means the rows adapt a model that knows the images but not the VQA task, as MILE
    adapted a pretrained MISS to VQA-RAD and SLAKE; with VQA sources only, pretraining uses them.
    """
    from scaling.data.loading import load_sources, require_records, training_sources

    train_data = require_records(load_sources(training_sources(cfg, accelerator), cfg.data))
    vqa = [s for s in train_data if s.records[0].task == "vqa"]
    if not vqa:
        raise ConfigError(["the sweep scores VQA (MILE's Opened/Closed/Global): configure at least one VQA source"])
    others = [s for s in train_data if s not in vqa] or train_data
    test_sources = [dataclasses.replace(s.source, split="test") for s in vqa]
    test = require_records(load_sources(test_sources, cfg.data, cfg.eval.max_samples))
    return SweepData(train_data, vqa, test, others)


def run_rows(accelerator, recipe: Path, config_file: Path, rows: list[Row], processes: int = 1,
             threads: int | None = None):
    """Run each row in a fresh process, `processes` at a time, a row only after the row it starts from; yield
    (row, exit status) as they finish (a row whose start row failed is not run and yields 1).

    Several processes at a time (single-process launches only) run with `threads` intra-op threads each, and write
    their console output to <row dir>/console.log.
    """
    if processes == 1:
        for row in rows:
            yield row, run_in_own_process(accelerator, recipe, config_file, row.label)
        return
    pending, running, finished = list(rows), {}, {}
    while pending or running:
        for row in list(pending):
            start = row.start_row.label if row.start_row else None
            if start is not None and start not in finished:
                continue
            if start is not None and finished[start]:
                pending.remove(row)
                finished[row.label] = 1
                yield row, 1
            elif len(running) < processes:
                pending.remove(row)
                running[row.label] = (row, start_row_process(recipe, config_file, row, threads))
        time.sleep(0.5)
        for label, (row, process) in list(running.items()):
            if process.poll() is not None:
                del running[label]
                finished[label] = process.returncode
                yield row, process.returncode


def start_row_process(recipe: Path, config_file: Path, row: Row, threads: int | None) -> subprocess.Popen:
    """The row's process in the background, its console output in <row dir>/console.log."""
    log_file = row_dir(config_file.parent, row) / "console.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    extra = [f"train.cpu_threads={threads}"] if threads else []
    with log_file.open("w") as out:
        return subprocess.Popen(row_command(recipe, config_file, row.label) + extra, stdout=out,
                                stderr=subprocess.STDOUT)


def row_command(recipe: Path, config_file: Path, sweep_row: str) -> list[str]:
    return [sys.executable, str(recipe), "--config", str(config_file), f"peft.sweep_row={sweep_row}"]


def run_in_own_process(accelerator, recipe: Path, config_file: Path, sweep_row: str) -> int:
    """Run `recipe --config config_file peft.sweep_row=...` in a fresh process on every rank; the exit status, non-zero
    when the process failed on any rank (sync point).

    Under a multi-process launch each rank starts its part of the new process group with the launch environment it
    was given (rank, world size, accelerate/DeepSpeed settings) and a fresh port that rank 0 picked.
    """
    import torch
    from accelerate.utils import broadcast_object_list

    env = dict(os.environ)
    if accelerator.num_processes > 1:
        port = [free_port() if accelerator.is_main_process else None]
        broadcast_object_list(port)
        env["MASTER_PORT"] = str(port[0])
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # the new group hosts its own store on the new port
    status = subprocess.run(row_command(recipe, config_file, sweep_row), env=env).returncode
    statuses = accelerator.gather(torch.tensor([status], device=accelerator.device))
    return int(statuses.abs().max())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------------
# The table of a sweep

COLUMNS = ["label", "ViT", "JTM", "Dec", "rank", "quantize", "data", "seed", "params_pct", "trainable", "parameters",
           "opened", "closed", "global", "answer_type_open", "answer_type_closed", "memory_mib", "memory_kind", "pid",
           "final_loss", "seconds", "n_closed", "n_opened"]
METRIC_NOTE = ("Opened / Closed as MILE scores them (ACC.py: Closed = questions whose reference is yes or no, Opened = "
               "the rest); Open / Closed (answer_type) as the dataset labels its questions; Global = all questions "
               "(the same under both).")


def table_row(cfg: Config, counts: dict, scores: dict, measured: dict) -> dict:
    """One line of the table; with several VQA test sets their accuracies are averaged. `measured`: memory_mib,
    memory_kind, pid, final_loss, seconds, n_closed, n_opened."""
    def score(name: str) -> float | None:
        values = [v for k, v in scores.items() if k.endswith("/" + name)]
        return sum(values) / len(values) if values else None

    row = Row.parse(cfg.peft.sweep_row)
    peft = cfg.peft
    adapted = {peft.vision, peft.encoder, peft.decoder}
    return {
        "label": row.label, "ViT": SHORT[peft.vision], "JTM": SHORT[peft.encoder], "Dec": SHORT[peft.decoder],
        "rank": peft.r if adapted & {"lora", "dora"} else None,
        "quantize": None if peft.quantize == "none" else peft.quantize, "data": row.data, "seed": cfg.train.seed,
        "params_pct": counts["all"]["trainable_pct"], "trainable": counts["all"]["trainable"],
        "parameters": counts["all"]["total"],
        "opened": score("non_yes_no_accuracy"), "closed": score("yes_no_accuracy"), "global": score("accuracy"),
        "answer_type_open": score("open_accuracy"), "answer_type_closed": score("closed_accuracy"), **measured,
    }


def write_table(rows: list[dict], out_dir: Path) -> dict[str, Path]:
    """peft_sweep.json / .csv / .md / .png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"peft_sweep.{ext}" for ext in ("json", "csv", "md", "png")}
    paths["json"].write_text(json.dumps(rows, indent=2))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    paths["md"].write_text(markdown_table(rows))
    plot_accuracy(rows, paths["png"])
    return paths


def fmt(value, digits: int = 2) -> str:
    """A table cell: '–' for missing values."""
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
    """MILE's layout (ViT | JTM | Dec | Rank | #Params | Memory | Opened | Closed | Global) + the answer_type view."""
    head = ("| Row | ViT | JTM | Dec | Rank | Data | #Params (%) | Memory (MiB) | Opened | Closed | Global | "
            "Open (answer_type) | Closed (answer_type) | Final loss |\n"
            "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = [f"| {r['label']} | {r['ViT']} | {r['JTM']} | {r['Dec']}{' (' + r['quantize'] + ')' if r['quantize'] else ''}"
             f" | {fmt(r['rank'])} | {r['data']} | {fmt(r['params_pct'], 3)} | {fmt(r['memory_mib'], 0)} | "
             f"{fmt(r['opened'])} | {fmt(r['closed'])} | {fmt(r['global'])} | {fmt(r['answer_type_open'])} | "
             f"{fmt(r['answer_type_closed'])} | {fmt(r['final_loss'], 3)} |" for r in rows]
    return head + "\n".join(lines) + "\n\n" + METRIC_NOTE + " Memory: " + memory_note(rows) + "\n"


def memory_note(rows: list[dict]) -> str:
    kinds = sorted({r["memory_kind"] for r in rows})
    return "; ".join(kinds) + ", measured in each row's own process." if kinds else "–"


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
