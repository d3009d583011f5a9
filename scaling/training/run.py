"""A training run's pieces, in the order a recipe calls them.

    cfg, accelerator = start_run(argv, description)               # config validated before any work, seed
    train_data = load_sources(training_sources(cfg, accelerator), cfg.data)
    tokenizer = build_tokenizer(cfg, accelerator, train_data)
    model = build_model(cfg, tokenizer)
    prepared = prepare_for_training(accelerator, model, cfg)      # optimizer, schedule, EMA, one prepare()
    start = resume(cfg, accelerator, stream, prepared.ema)
    step = train(cfg, accelerator, prepared, stream, start)       # scaling.training.loop
    finish_training(cfg, accelerator, prepared, tokenizer, stream, step)

`run_recipe(main)` is every recipe's `__main__`: user mistakes are one message and exit code 2, a run stopped for a
known reason (a damaged checkpoint, a run of non-finite losses) one message and exit code 1; anything else keeps its
traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed

from scaling.config import Config, ConfigError, Runtime, parse_cli, save_config
from scaling.data.images import ImageError
from scaling.data.loading import SourceSplit
from scaling.data.records import DataError
from scaling.logging import get_logger, setup_logging
from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.safe_load import CheckpointLoadError
from scaling.training.checkpoint import (
    TOKENIZER_DIR,
    CheckpointError,
    export_from_run,
    find_resume,
    load_checkpoint,
    save_checkpoint,
    save_run_model_info,
)
from scaling.training.distributed import (
    build_accelerator,
    cast_for_deepspeed,
    fill_deepspeed_auto,
    log_parameter_shares,
    uses_deepspeed_cpu_adam,
)
from scaling.training.ema import EMA
from scaling.training.optim import build_optimizer, build_scheduler
from scaling.training.tracking import plot_loss, truncate_metrics

log = get_logger(__name__)

USER_ERRORS = (ConfigError, DataError, ImageError, CheckpointLoadError, FileNotFoundError)
"""A mistake in what the user asked for: the message names the file, the record or the key, and the fix."""
STOPPED = (CheckpointError, FloatingPointError)
"""The run stopped for a reason it explains (a damaged checkpoint, a run of non-finite losses)."""


def run_recipe(main: Callable[[], object]) -> None:
    """Run a recipe's main() and exit: 0, 2 for user errors, 1 for explained stops; other errors keep the traceback."""
    try:
        sys.exit(main() or 0)
    except USER_ERRORS as error:
        report_error(error, every_rank=not isinstance(error, ConfigError))
        sys.exit(2)
    except STOPPED as error:
        report_error(error, every_rank=True)
        sys.exit(1)


def report_error(error: Exception, every_rank: bool) -> None:
    """The message without a traceback; a config error is the same on every rank, so rank 0 says it once."""
    get_logger("recipe").error("%s", error, extra={"all_ranks": every_rank})


def start_run(argv: list[str] | None, description: str) -> tuple[Config, Accelerator]:
    """The config (YAML + overrides, validated against the launch environment before any work), logging into the
    run directory, the Accelerator, the resolved config.yaml and the seed."""
    cfg, config_path = parse_cli(argv, description)
    cfg.validate(Runtime.from_env(), source=config_path)
    setup_logging(cfg.train.output_dir, cfg.logging.level)
    accelerator = build_accelerator(cfg)  # processes, precision, trackers
    if accelerator.is_main_process:
        save_config(cfg, cfg.train.output_dir)
    set_seed(cfg.train.seed)  # identical weights on every rank, then per-rank data order
    return cfg, accelerator


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and model


def tokenizer_corpus(splits: list[SourceSplit]) -> list[str]:
    """Prompts, targets and candidate answers of the training records: the text a default BPE is trained on."""
    from scaling.data.tasks import get_task

    texts = []
    for split in splits:
        for record in split.records:
            task = get_task(record.task)
            texts.append(task.prompt(record))
            texts.extend([task.target(record), *(task.candidates(record) or [])])
    return texts


def build_tokenizer(cfg: Config, accelerator, train_data: list[SourceSplit]):
    """The configured tokenizer, or a BPE trained on the training text (rank 0 trains and saves it once)."""
    from scaling.models.biomedgpt.tokenization import load_tokenizer, train_bpe_tokenizer

    path = cfg.model.tokenizer or cfg.model.checkpoint
    if path:
        return load_tokenizer(path)
    run_tokenizer = Path(cfg.train.output_dir) / TOKENIZER_DIR
    with accelerator.main_process_first():
        if accelerator.is_main_process and not run_tokenizer.is_dir():
            train_bpe_tokenizer(tokenizer_corpus(train_data)).save_pretrained(run_tokenizer)
    return load_tokenizer(run_tokenizer)


def model_overrides(cfg: Config) -> dict:
    """BiomedGPTConfig fields the run config sets on top of the preset or checkpoint."""
    overrides = {"label_smoothing": cfg.train.label_smoothing, **cfg.model.overrides}
    if cfg.model.image_size is not None:
        overrides["image_size"] = cfg.model.image_size
    if cfg.model.dropout is not None:
        overrides["dropout"] = cfg.model.dropout
    if cfg.model.drop_path_rate is not None:
        overrides["encoder_drop_path_rate"] = overrides["decoder_drop_path_rate"] = cfg.model.drop_path_rate
    return overrides


def build_model(cfg: Config, tokenizer) -> BiomedGPTForConditionalGeneration:
    """Preset (or checkpoint) + config overrides, gradient checkpointing, PEFT, frozen embeddings."""
    if cfg.model.checkpoint:
        model = BiomedGPTForConditionalGeneration.from_pretrained(
            cfg.model.checkpoint, attn_implementation=cfg.model.attn_implementation, **model_overrides(cfg))
    else:
        config = BiomedGPTConfig.from_preset(cfg.model.preset, vocab_size=len(tokenizer), **model_overrides(cfg))
        config._attn_implementation = cfg.model.attn_implementation
        model = BiomedGPTForConditionalGeneration(config)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.peft.enabled:
        from scaling.adapters import apply_peft, count_trainable, print_trainable

        model = apply_peft(model, cfg.peft)
        print_trainable(count_trainable(model))
    if cfg.train.freeze_embeddings:  # after PEFT's trainable policy; tied, so the output projection freezes too
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


def build_tokenizer_and_model(cfg: Config, accelerator, train_data: list[SourceSplit]):
    """Tokenizer and model; what `scaling export` needs besides the weights is written into the run directory."""
    tokenizer = build_tokenizer(cfg, accelerator, train_data)
    model = build_model(cfg, tokenizer)
    if accelerator.is_main_process:
        save_run_model_info(Path(cfg.train.output_dir), model.config, tokenizer)
    return tokenizer, model


# ---------------------------------------------------------------------------------------------------------------------
# Prepare, resume, finish


@dataclass
class Prepared:
    """What `accelerator.prepare` returned, plus the EMA of the weights (None when train.ema_decay is 0)."""

    model: object
    optimizer: object
    scheduler: object
    ema: EMA | None


def prepare_for_training(accelerator: Accelerator, model, cfg: Config) -> Prepared:
    """Optimizer, schedule, DeepSpeed "auto" values, DeepSpeed's buffer cast, one prepare() call, EMA."""
    optimizer = build_optimizer(model, cfg.train, deepspeed_cpu_adam=uses_deepspeed_cpu_adam(accelerator))
    scheduler = build_scheduler(optimizer, cfg.train)
    fill_deepspeed_auto(accelerator, cfg)
    model = cast_for_deepspeed(accelerator, model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    log_parameter_shares(accelerator, model)
    ema = EMA(accelerator.unwrap_model(model), cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    return Prepared(model, optimizer, scheduler, ema)


def resume(cfg: Config, accelerator, stream, ema: EMA | None) -> int:
    """Load the checkpoint train.resume points at (none: start at step 0); drop step-log lines it will redo."""
    path = find_resume(cfg.train.output_dir, cfg.train.resume)
    if path is None:
        if cfg.train.resume == "auto":
            log.info("train.resume=auto: no complete checkpoint in %s, starting at step 0", cfg.train.output_dir)
        start = 0
    else:
        state = load_checkpoint(accelerator, path, ema)
        stream.load_state_dict(state["data"])
        start = state["step"]
        log.info("resumed from %s at step %d", path, start)
    if accelerator.is_main_process:
        dropped = truncate_metrics(cfg.train.output_dir, start)
        if dropped:
            log.info("dropped %d step-log lines after step %d (those steps are redone)", dropped, start)
    accelerator.wait_for_everyone()
    return start


def finish_training(cfg: Config, accelerator, prepared: Prepared, tokenizer, stream, step: int) -> Path:
    """Stop the batch stream, write the final checkpoint, export (EMA weights when enabled), plot the loss curve."""
    run_dir = Path(cfg.train.output_dir)
    stream.close()
    if step % cfg.train.save_every:
        save_checkpoint(accelerator, run_dir, step, {"data": stream.state_dict()}, cfg.train.keep_last, prepared.ema)
    if prepared.ema is not None:
        prepared.ema.copy_to(accelerator.unwrap_model(prepared.model))
    export = export_from_run(accelerator, prepared.model, tokenizer, run_dir / "export")
    if accelerator.is_main_process:
        plot_loss(run_dir)
    return export


def evaluate_after_training(cfg: Config, accelerator, model, tokenizer, held_out: list[SourceSplit],
                            formatter) -> dict[str, float]:
    """The evaluation library on the held-out datasets, with the training prompts; report in <output_dir>/eval."""
    from scaling.evaluation.runner import eval_collator, evaluate_model

    collator = eval_collator(tokenizer, cfg, accelerator.unwrap_model(model).config, formatter)
    model.eval()
    return evaluate_model(model, tokenizer, held_out, cfg, accelerator,
                          Path(cfg.train.output_dir) / "eval", collator=collator, name=Path(cfg.train.output_dir).name)
