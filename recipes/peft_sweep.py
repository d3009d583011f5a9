"""MILE's component × method table: train every (vision, encoder, decoder) PEFT policy for the same budget, score VQA.

Launch from the repository root (one process; the rows run one after another in it):

    python recipes/peft_sweep.py --config recipes/configs/biomedgpt/peft_sweep_synthetic.yaml
    python recipes/peft_sweep.py --config recipes/configs/biomedgpt/peft_sweep_vqa_rad.yaml \
        "peft.sweep=[T-T-T, F-LoRA-LoRA:4, T-T-LoRA:4]" train.max_steps=2000

Each row (peft.sweep, MILE's ViT-JTM-Dec labels; empty = DEFAULT_GRID, the rows of MILE Tables 1-4) is trained with
the fine-tuning recipe's loop on the VQA sources for train.max_steps steps, then scored on their test split. With
peft.sweep_pretrain_steps every row starts from one model fully fine-tuned first on the other tasks' sources. Written
to train.output_dir: peft_sweep.{md,csv,json} (ViT / JTM / Dec, rank, #Params %, memory, Opened, Closed, Global) and
peft_sweep.png (accuracy against trainable %); per row rows/<label>/ holds its step log, adapter and eval report.
Memory is the peak of the row's training: CUDA max allocated, or the process's peak RSS on CPU (which also holds
the data and the Python runtime, so compare rows, not absolute values).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

from accelerate.utils import set_seed
from finetune import build_model, build_tokenizer, train  # recipes/ is on sys.path when run as a script

from scaling.adapters import count_trainable, save_adapter
from scaling.config import Config, ConfigError, Runtime, parse_cli, save_config, sweep_row
from scaling.data.records import Record
from scaling.evaluation.runner import evaluate_model
from scaling.logging import get_logger, setup_logging
from scaling.training.batches import BatchStream, load_split, training_sources
from scaling.training.distributed import build_accelerator, fill_deepspeed_auto
from scaling.training.memory import peak_memory, reset_peak_memory
from scaling.training.optim import build_optimizer, build_scheduler

log = get_logger("recipes.peft_sweep")

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


def row_configs(cfg: Config, base_dir: Path | None) -> list[tuple[str, Config]]:
    """(label, config) per row; every row validated before any training, all problems at once."""
    rows, problems = [], []
    model = dataclasses.replace(cfg.model, checkpoint=str(base_dir)) if base_dir else cfg.model
    for label in cfg.peft.sweep or DEFAULT_GRID:
        peft = dataclasses.replace(cfg.peft, **sweep_row(label), sweep=[])
        row = with_run(dataclasses.replace(cfg, model=model, peft=peft),
                       Path(cfg.train.output_dir) / "rows" / label.replace(":", "_r").replace("@", "_"))
        problems += [f"row {label}: {p}" for p in row.problems(Runtime.from_env())]
        rows.append((label, row))
    if problems:
        raise ConfigError(problems)
    return rows


def with_run(cfg: Config, run_dir: Path, max_steps: int | None = None) -> Config:
    """The config of one training run of the sweep: its own directory, no step checkpoints (the sweep keeps the
    adapter or the model instead)."""
    steps = max_steps or cfg.train.max_steps
    train = dataclasses.replace(cfg.train, output_dir=str(run_dir), max_steps=steps, save_every=steps + 1)
    return dataclasses.replace(cfg, train=train)


@dataclasses.dataclass
class SweepData:
    """Records of every training source (the tokenizer's corpus), the VQA ones every row trains and is scored on, and
    the others, on which the common starting model is pretrained."""

    train_records: dict[str, list[Record]]
    vqa_sources: list
    vqa_train: dict[str, list[Record]]
    vqa_test: dict[str, list[Record]]
    pretrain_sources: list
    pretrain_records: dict[str, list[Record]]


def sweep_data(cfg: Config, accelerator) -> SweepData:
    """Load every training source and split them into the VQA sources (rows) and the rest (pretraining).

    Pretraining on the other tasks means the rows adapt a model that knows the images but not the VQA task, as MILE
    adapted a pretrained MISS to VQA-RAD and SLAKE; with VQA sources only, pretraining uses them.
    """
    sources = training_sources(cfg, accelerator)
    train_records = load_split(sources, cfg.data, "train")
    is_vqa = [bool(records) and records[0].task == "vqa" for records in train_records.values()]
    if not any(is_vqa):
        raise ValueError("the sweep scores VQA (MILE's Opened/Closed/Global): configure at least one VQA source")

    def pick(vqa: bool) -> tuple[list, dict[str, list[Record]]]:
        chosen = [i for i, flag in enumerate(is_vqa) if flag == vqa]
        return [sources[i] for i in chosen], {k: v for i, (k, v) in enumerate(train_records.items()) if i in chosen}

    vqa_sources, vqa_train = pick(True)
    pretrain_sources, pretrain_records = pick(False) if not all(is_vqa) else (sources, train_records)
    vqa_test = load_split(vqa_sources, cfg.data, "test")
    if cfg.eval.max_samples:
        vqa_test = {k: v[: cfg.eval.max_samples] for k, v in vqa_test.items()}
    return SweepData(train_records, vqa_sources, vqa_train, vqa_test, pretrain_sources, pretrain_records)


def fit(cfg: Config, tokenizer, sources, train_records: dict[str, list[Record]], label: str):
    """Build the model of `cfg` (PEFT applied), train it with the fine-tuning loop; returns it prepared, with its
    accelerator, trainable counts and peak training memory."""
    accelerator = build_accelerator(cfg)
    set_seed(cfg.train.seed)  # every row starts from the same weights and draws the same batches
    if accelerator.is_main_process:
        save_config(cfg, cfg.train.output_dir)
    reset_peak_memory()
    model = build_model(cfg, tokenizer)
    counts = count_trainable(model)
    stream = BatchStream(train_records, sources, cfg, tokenizer, model.config.image_size,
                         accelerator.process_index, accelerator.num_processes)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    fill_deepspeed_auto(accelerator, cfg)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.init_trackers(label)
    train(cfg, accelerator, model, optimizer, scheduler, stream, 0, None)
    stream.close()
    memory = peak_memory(accelerator.device)
    accelerator.free_memory(optimizer, scheduler)
    return model, accelerator, counts, memory


def pretrain_base(cfg: Config, tokenizer, sources, train_records) -> Path:
    """Full fine-tuning on `sources`, saved as the checkpoint all rows start from."""
    run_dir = Path(cfg.train.output_dir) / "pretrain"
    base = dataclasses.replace(cfg, peft=dataclasses.replace(cfg.peft, vision="full", encoder="full", decoder="full",
                                                             quantize="none", sweep=[]))
    model, accelerator, _, _ = fit(with_run(base, run_dir, cfg.peft.sweep_pretrain_steps), tokenizer, sources,
                                   train_records, "pretrain")
    base_dir = run_dir / "model"
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(base_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return base_dir


def run_row(label: str, cfg: Config, tokenizer, sources, train_records, test_records) -> dict:
    """Train one policy for the fixed budget and score it; returns its table row."""
    start = time.perf_counter()
    model, accelerator, counts, memory = fit(cfg, tokenizer, sources, train_records, label)
    if cfg.peft.enabled:
        save_adapter(accelerator.unwrap_model(model), Path(cfg.train.output_dir) / "adapter",
                     accelerator.is_main_process)
    scores = evaluate_model(model, tokenizer, test_records, cfg, accelerator, Path(cfg.train.output_dir) / "eval",
                            name=label)
    accelerator.end_training()
    accelerator.free_memory(model)
    return table_row(cfg, counts, memory, scores, final_loss(cfg), time.perf_counter() - start)


def final_loss(cfg: Config) -> float | None:
    from scaling.training.tracking import read_metrics

    losses = [r["loss"] for r in read_metrics(cfg.train.output_dir) if "loss" in r]
    return losses[-1] if losses else None


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


def main(argv: list[str] | None = None) -> None:
    # 1. config and every row's config, validated before any work
    cfg, config_path = parse_cli(argv, __doc__.splitlines()[0])
    cfg.validate(Runtime.from_env(), source=config_path)
    out_dir = Path(cfg.train.output_dir)
    base_dir = out_dir / "pretrain" / "model" if cfg.peft.sweep_pretrain_steps else None
    rows = row_configs(cfg, base_dir)
    setup_logging(out_dir, cfg.logging.level)
    log.info("PEFT sweep: %d rows × %d steps → %s", len(rows), cfg.train.max_steps, out_dir)

    # 2. data and tokenizer once, shared by all rows; optionally the common starting model
    accelerator = build_accelerator(cfg)
    set_seed(cfg.train.seed)
    data = sweep_data(cfg, accelerator)
    tokenizer = build_tokenizer(cfg, accelerator, data.train_records)
    if base_dir:
        log.info("pretraining the common starting model: %d steps on %s", cfg.peft.sweep_pretrain_steps,
                 ", ".join(data.pretrain_records))
        pretrain_base(cfg, tokenizer, data.pretrain_sources, data.pretrain_records)

    # 3. the rows, one after another; the table is rewritten after each so a long sweep can be read while it runs
    table = []
    for label, row_cfg in rows:
        log.info("row %s", label)
        table.append({"label": label, **run_row(label, row_cfg, tokenizer, data.vqa_sources, data.vqa_train,
                                                 data.vqa_test)})
        if accelerator.is_main_process:
            paths = write_table(table, out_dir)
    if accelerator.is_main_process:
        log.info("table: %s\n%s", paths["md"], paths["md"].read_text())


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
