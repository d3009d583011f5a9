"""A training run's pieces, in the order a recipe calls them.

    cfg, accelerator = start_run(argv, description)               # config validated before any work, seed
    train_data = load_sources(training_sources(cfg, accelerator), cfg.data)
    tokenizer = build_tokenizer(cfg, accelerator, train_data)
    model = build_model(cfg, tokenizer)
    prepared = prepare_for_training(accelerator, model, cfg)      # optimizer, schedule, EMA, one prepare()
    start = resume(cfg, accelerator, stream, prepared)            # this run's optimizer and schedule settings
    step = train(cfg, accelerator, prepared, stream, start)       # scaling.training.loop
    finish_training(cfg, accelerator, prepared, tokenizer, stream, step)

`run_recipe(main)` is every recipe's `__main__`: user mistakes are one message and exit code 2, a run stopped for a
known reason (a damaged checkpoint, a run of non-finite losses, a full disk) one message and exit code 1; anything
else keeps its traceback.
"""

from __future__ import annotations

import errno
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from scaling.config import Config, ConfigError, Runtime, parse_cli, save_config
from scaling.data.images import ImageError
from scaling.data.loading import SourceSplit
from scaling.data.records import DataError
from scaling.logging import get_logger, setup_logging
from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.safe_load import CheckpointLoadError, check_pickles
from scaling.training.checkpoint import (
    TOKENIZER_DIR,
    CheckpointError,
    changed_settings,
    checkpoint_dir,
    export_from_run,
    list_checkpoints,
    load_checkpoint,
    no_usable_checkpoint,
    remove_partial_saves,
    replace_atomically,
    resume_candidates,
    save_checkpoint,
    save_run_model_info,
    trainer_state,
    verify_checkpoint,
)
from scaling.training.distributed import (
    build_accelerator,
    cast_for_deepspeed,
    die_with_launcher,
    fill_deepspeed_auto,
    log_parameter_shares,
    unwrapped,
    uses_deepspeed_cpu_adam,
)
from scaling.training.ema import EMA
from scaling.training.optim import build_optimizer, build_scheduler
from scaling.training.run_lock import RunDirectoryBusy, lock_run_directory
from scaling.training.tracking import plot_loss, truncate_metrics

log = get_logger(__name__)

USER_ERRORS = (ConfigError, DataError, ImageError, CheckpointLoadError, RunDirectoryBusy, FileNotFoundError,
               PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)
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
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        report_error(OSError(f"no space left on the device of {error.filename or 'the run directory'}: free space, "
                             "then resume with train.resume=auto"), every_rank=True)
        sys.exit(1)


def report_error(error: Exception, every_rank: bool) -> None:
    """The message without a traceback; a config error is the same on every rank, so rank 0 says it once."""
    get_logger("recipe").error("%s", error, extra={"all_ranks": every_rank})


def start_run(argv: list[str] | None, description: str) -> tuple[Config, Accelerator]:
    """The config (YAML + overrides, validated against the launch environment before any work), logging into the
    run directory, the Accelerator, the resolved config.yaml and the seed."""
    die_with_launcher()  # a killed launcher stops its workers at the next step boundary
    exempt_from_cycle_collection()  # the imported modules
    runtime = Runtime.from_env()
    cfg, config_path = parse_cli(argv, description, runtime)
    cfg.validate(runtime, source=config_path)
    setup_logging(cfg.train.output_dir, cfg.logging.level)
    accelerator = build_accelerator(cfg)  # processes, precision, trackers
    hold_run_directory(accelerator, cfg.train.output_dir)
    if accelerator.is_main_process:
        remove_partial_saves(cfg.train.output_dir)  # left by a killed run; no other run writes here now
        save_config(cfg, cfg.train.output_dir)
    set_seed(cfg.train.seed)  # identical weights on every rank, then per-rank data order
    return cfg, accelerator


def exempt_from_cycle_collection() -> None:
    """Move every object alive now to Python's permanent generation. Recipes call it once the imported modules, then
    the records, are in place: they live until exit, yet the cycle collector traversed their ~600k objects in every
    full collection and once more at interpreter exit (2.3 s of a default-job process, 1.5 s of it after the last
    line of output). Reference counting still frees them; only the cycle search skips them, so this is for what the
    process keeps, never for a model or optimizer that a caller may drop and rebuild."""
    gc.freeze()


def hold_run_directory(accelerator: Accelerator, run_dir: str) -> None:
    """Rank 0 locks the run directory for this run; every rank stops when another live run holds it (sync point)."""
    [busy] = broadcast_object_list([lock_run_directory(run_dir) if accelerator.is_main_process else None])
    if busy:
        raise RunDirectoryBusy(busy)


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
        if accelerator.is_main_process and not run_tokenizer.is_dir():  # once per run directory, atomically
            replace_atomically(run_tokenizer, train_bpe_tokenizer(tokenizer_corpus(train_data)).save_pretrained)
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
    """What `accelerator.prepare` returned, plus the EMA of the weights (None when train.ema_decay is 0) and the
    checkpoint the training state was last saved to or resumed from (the parent of the next save)."""

    model: object
    optimizer: object
    scheduler: object
    ema: EMA | None
    checkpoint: Path | None = None


def prepare_for_training(accelerator: Accelerator, model, cfg: Config) -> Prepared:
    """Optimizer, schedule, DeepSpeed "auto" values, DeepSpeed's buffer cast, one prepare() call, EMA."""
    optimizer = build_optimizer(model, cfg.train, deepspeed_cpu_adam=uses_deepspeed_cpu_adam(accelerator))
    scheduler = build_scheduler(optimizer, cfg.train)
    fill_deepspeed_auto(accelerator, cfg)
    model = cast_for_deepspeed(accelerator, model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    log_parameter_shares(accelerator, model)
    ema = EMA(unwrapped(accelerator, model), cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    return Prepared(model, optimizer, scheduler, ema)


def resume(cfg: Config, accelerator, stream, prepared: Prepared) -> int:
    """Load the checkpoint train.resume points at (none: start at step 0) and apply this run's optimizer and schedule
    settings on top; drop the step-log lines it will redo.

    For 'auto' that is the newest intact checkpoint of the live line: a damaged one (checksum, manifest, a load
    failure) is skipped with a warning for its parent. A checkpoint holding code-running pickles stops the run.
    """
    start, settings, problems = 0, optimizer_settings(prepared), []
    for path in resume_candidates(cfg.train.output_dir, cfg.train.resume):
        try:
            state = restore_checkpoint(accelerator, path, prepared.ema)
        except CheckpointError as err:
            if cfg.train.resume != "auto":
                raise
            log.warning("%s; falling back to the previous checkpoint of this run", err, extra={"all_ranks": True})
            problems.append(str(err))
            continue
        apply_optimizer_settings(prepared, settings)
        log_setting_changes(state.get("config"), cfg, path)
        stream.load_state_dict(state["data"])
        start, prepared.checkpoint = state["step"], path
        log.info("resumed from %s at step %d", path, start)
        break
    else:
        if problems or (cfg.train.resume == "auto" and list_checkpoints(cfg.train.output_dir)):
            raise no_usable_checkpoint(cfg.train.output_dir, problems)
        if cfg.train.resume == "auto":
            log.info("train.resume=auto: no complete checkpoint in %s, starting at step 0", cfg.train.output_dir)
    if accelerator.is_main_process:
        dropped = truncate_metrics(cfg.train.output_dir, start)
        if dropped:
            log.info("dropped %d step-log lines after step %d (those steps are redone)", dropped, start)
    accelerator.wait_for_everyone()
    return start


def restore_checkpoint(accelerator: Accelerator, path: Path, ema: EMA | None) -> dict:
    """Rank 0 verifies the checkpoint (checksums, pickle allowlist), then every rank loads it; a failure anywhere is
    the same CheckpointError on every rank (sync points)."""
    verdict = None
    if accelerator.is_main_process:
        try:
            verify_checkpoint(path)
            check_pickles(path)
        except (CheckpointError, CheckpointLoadError) as err:
            verdict = (isinstance(err, CheckpointLoadError), str(err))
    [verdict] = broadcast_object_list([verdict])
    if verdict is not None:
        unsafe, message = verdict
        raise (CheckpointLoadError if unsafe else CheckpointError)(message)
    try:
        state, failure = load_checkpoint(accelerator, path, ema), None
    except CheckpointError as err:
        state, failure = None, str(err)
    failures = [f for f in gather_object([failure]) if f is not None]
    if failures:
        raise CheckpointError(failures[0])
    return state


def optimizer_settings(prepared: Prepared) -> list[tuple[float, float]]:
    """(peak lr, weight decay) of each parameter group, as this run's config built them."""
    groups = prepared.optimizer.param_groups
    return [(base, group["weight_decay"]) for base, group in zip(prepared.scheduler.scheduler.base_lrs, groups,
                                                                 strict=True)]


def apply_optimizer_settings(prepared: Prepared, settings: list[tuple[float, float]]) -> None:
    """After a resume: this run's peak lr and weight decay over the restored moments and step count; the schedule's
    shape (warm-up, decay, max_steps) already is this run's. The restored state would bring back the checkpoint's."""
    schedule, groups = prepared.scheduler.scheduler, prepared.optimizer.param_groups
    schedule.base_lrs = [base for base, _ in settings]
    for group, (base, decay), factor in zip(groups, settings, schedule.lr_lambdas, strict=True):
        group.update(weight_decay=decay, initial_lr=base, lr=base * factor(schedule.last_epoch))
    schedule._last_lr = [group["lr"] for group in groups]


def log_setting_changes(saved: dict | None, cfg: Config, path: Path) -> None:
    """Name every setting that differs from the checkpoint's: this run's values apply from here on."""
    for key, (old, new) in changed_settings(saved or {}, cfg.to_dict()).items():
        if key == "train.resume":  # how this run started, not how it trains
            continue
        log.warning("resume: %s=%r (checkpoint %s was trained with %r): this run's value applies from here on",
                    key, new, path.name, old)


def finish_training(cfg: Config, accelerator, prepared: Prepared, tokenizer, stream, step: int) -> Path:
    """Stop the batch stream, write the final checkpoint, export (EMA weights when enabled), plot the loss curve."""
    run_dir = Path(cfg.train.output_dir)
    stream.close()
    if prepared.checkpoint != checkpoint_dir(run_dir, step):  # the final state is not saved yet
        prepared.checkpoint = save_checkpoint(accelerator, run_dir, step, trainer_state(cfg, stream),
                                              cfg.train.keep_last, prepared.ema, parent=prepared.checkpoint)
    if prepared.ema is not None:
        prepared.ema.copy_to(unwrapped(accelerator, prepared.model))
    export = export_from_run(accelerator, prepared.model, tokenizer, run_dir / "export")
    if accelerator.is_main_process:
        plot_loss(run_dir)
    return export


def evaluate_after_training(cfg: Config, accelerator, model, tokenizer, held_out: list[SourceSplit],
                            formatter) -> dict[str, float]:
    """The evaluation library on the held-out datasets, with the training prompts; report in <output_dir>/eval."""
    from scaling.evaluation.runner import eval_collator, evaluate_model

    collator = eval_collator(tokenizer, cfg, unwrapped(accelerator, model).config, formatter)
    model.eval()
    return evaluate_model(model, tokenizer, held_out, cfg, accelerator,
                          Path(cfg.train.output_dir) / "eval", collator=collator, name=Path(cfg.train.output_dir).name)
