"""Typed run configuration: one dataclass per concern, YAML files, dotted `key=value` overrides, validation.

    cfg = load_config("recipes/configs/biomedgpt/tiny_instruct.yaml", ["train.lr=1e-5", "peft.decoder=lora"])
    cfg.validate()            # raises ConfigError listing every problem at once
    save_config(cfg, run_dir) # writes run_dir/config.yaml, the resolved config

Every field has exactly one default (here) and a docstring (the string right below it). Unknown keys are errors with
a "did you mean" suggestion; values are checked against the field's type before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from scaling.environment import require_supported_versions


class ConfigError(ValueError):
    """One or more configuration problems, all listed in the message."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} configuration problem(s){where}:\n{lines}")


@dataclass
class SourceArgs:
    """One dataset in the run: a registered loader, where its files are, which split, its mixture weight."""

    name: str = "synthetic"
    """Loader name from `scaling.data.sources.SOURCES` (e.g. vqa_rad, slake, pathvqa, pubmedqa, biomedgpt_tsv)."""
    path: str | None = None
    """Directory or file of the dataset in its native release format (None: the embedded synthetic data)."""
    split: str = "train"
    """Split to read: train, validation or test."""
    weight: float = 1.0
    """Relative sampling weight in the multi-task mixture."""
    options: dict[str, Any] = field(default_factory=dict)
    """Loader-specific options, e.g. {q_lang: en} for SLAKE or {task: vqa} for BiomedGPT TSV files."""
    label: str | None = None
    """Name in logs and reports (None: <name>/<split>)."""

    def problems(self) -> list[str]:
        out = []
        if self.weight <= 0:
            out.append(f"data source {self.name!r}: weight must be > 0, got {self.weight}")
        if self.split not in ("train", "validation", "test"):
            out.append(f"data source {self.name!r}: split must be train, validation or test, got {self.split!r}")
        elif self.name != "synthetic":
            from scaling.data.sources import source_problems  # late: loads torch; data.tasks imports this module

            out += source_problems(self.name, self.split, self.options)
        return out


@dataclass
class ModelArgs:
    """Which model to build or load."""

    preset: str = "mini"
    """Size preset (test, mini, tiny, medium, base, large, xlarge) used when no checkpoint is given."""
    checkpoint: str | None = None
    """Directory written by save_pretrained / `scaling convert` / `scaling export`; overrides the preset."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to the checkpoint directory, or a BPE trained on the data when neither is set."""
    image_size: int | None = None
    """Input resolution in pixels (None: the preset's)."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel: sdpa (fused, carries the additive position bias) or eager (reference path)."""
    dropout: float | None = None
    """Residual/attention dropout (None: the preset's)."""
    drop_path_rate: float | None = None
    """Stochastic-depth rate of the last layer, rising linearly from 0 (None: the preset's; BiomedGPT used 0.1)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Extra BiomedGPTConfig fields applied on top of the preset, e.g. {encoder_layers: 2}."""

    def problems(self) -> list[str]:
        out = []
        if self.image_size is not None and (self.image_size < 16 or self.image_size % 16):
            out.append(f"model.image_size must be a positive multiple of 16 (ResNet stride), got {self.image_size}")
        for name in ("dropout", "drop_path_rate"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                out.append(f"model.{name} must be in [0, 1), got {value}")
        for name, marker in (("checkpoint", "config.json"), ("tokenizer", None)):
            path = getattr(self, name)
            if path is not None and not (Path(path) / (marker or "")).exists():
                out.append(f"model.{name}: {Path(path) / (marker or '')} does not exist; give a directory written by "
                           "save_pretrained, `scaling convert` or `scaling export`")
        return out + self.architecture_problems()

    SIZES = ("_layers", "_heads", "_dim", "d_model", "_width", "vocab_size", "max_positions", "bucket_size")

    def architecture_problems(self) -> list[str]:
        """An unknown preset, unknown or out-of-range model.overrides, and shapes BiomedGPTConfig refuses."""
        from scaling.models.biomedgpt.configuration import PRESETS, BiomedGPTConfig  # late: loads transformers

        if self.checkpoint is None and self.preset not in PRESETS:
            return [f"model.preset {self.preset!r} is unknown; choose one of {', '.join(PRESETS)}"]
        fields = {f.name: f for f in dataclasses.fields(BiomedGPTConfig)}
        unknown = sorted(set(self.overrides) - set(fields))
        if unknown:
            return [f"model.overrides: unknown BiomedGPTConfig field(s) {', '.join(unknown)}"]
        sizes = [k for k, v in self.overrides.items() if isinstance(fields[k].default, int) and k.endswith(self.SIZES)
                 and (isinstance(v, bool) or not isinstance(v, int) or v < 1)]
        if sizes:
            return [f"model.overrides.{k} must be a positive integer, got {self.overrides[k]!r}" for k in sizes]
        if self.checkpoint is not None:
            return []
        try:
            BiomedGPTConfig.from_preset(self.preset, **self.overrides)
        except (ValueError, TypeError) as err:
            return [f"model.overrides: {err}"]
        return []


@dataclass
class DataArgs:
    """What the model reads and how it is batched."""

    sources: list[SourceArgs] = field(default_factory=list)
    """Training sources; empty means the embedded synthetic dataset."""
    eval_sources: list[SourceArgs] = field(default_factory=list)
    """Evaluation sources; empty means the held-out split of the training sources."""
    synthetic_images: int = 2400
    """Number of images the embedded synthetic generator draws (train + held-out)."""
    synthetic_tasks: list[str] = field(default_factory=list)
    """Tasks of the embedded synthetic data to train on when data.sources is empty (empty: all six)."""
    synthetic_seed: int | None = None
    """Seed that draws the embedded synthetic data (None: train.seed). Runs that compare seeds of training on the same
    data (a PEFT sweep's /seedN repeats) fix it."""
    instruction: bool = False
    """Wrap samples in instruction templates (MILE-style closed/open templates with options)."""
    temperature: float = 1.0
    """Mixture temperature: p_i ∝ (w_i n_i)^(1/T); 1 samples proportionally to size, large T flattens."""
    max_src_len: int = 128
    """Maximum encoder text tokens (longer prompts are truncated and counted)."""
    max_tgt_len: int = 32
    """Maximum target tokens."""
    prompt_type: Literal["none", "prev_output"] = "prev_output"
    """prev_output: the decoder is prefixed with the prompt (BiomedGPT VQA), so the answer position sees the
    question; loss only on the answer. none: the decoder starts from <s> alone."""
    on_bad_record: Literal["skip", "error"] = "skip"
    """skip: drop bad records and report counts; error: stop at the first one, naming file, record and field."""
    num_workers: int = 2
    """Threads that decode and augment the next training batches' images while the model trains (0: in the training
    loop). The batches, and a resumed run's, are the same for any value."""
    cache_dir: str = ".cache/scaling"
    """Where generated data and dataset caches live."""

    def problems(self) -> list[str]:
        out = [p for s in self.sources + self.eval_sources for p in s.problems()]
        if self.temperature <= 0:
            out.append(f"data.temperature must be > 0, got {self.temperature}")
        if self.max_src_len < 4 or self.max_tgt_len < 2:
            out.append("data.max_src_len must be >= 4 and data.max_tgt_len >= 2")
        if self.num_workers < 0:
            out.append(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.synthetic_images < 10:
            out.append(f"data.synthetic_images must be >= 10, got {self.synthetic_images}")
        from scaling.data.tasks import TASKS  # late: the data package imports this module

        unknown = sorted(set(self.synthetic_tasks) - set(TASKS))
        if unknown:
            out.append(f"data.synthetic_tasks: unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        return out


@dataclass
class TrainArgs:
    """Optimisation, precision, checkpointing."""

    output_dir: str = "runs/finetune"
    """Run directory: config, logs, metrics, checkpoints, exports and reports go here."""
    seed: int = 42
    """Seed for weights, data order and dropout; runs with the same seed are identical on CPU."""
    max_steps: int = 2000
    """Optimizer steps to train for."""
    batch_size: int = 32
    """Micro-batch size per process."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (global batch = batch_size × processes × this)."""
    lr: float = 5e-4
    """Peak learning rate (the default suits the embedded mini model; the size configs set their own)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases, norms and embeddings-bias tables)."""
    warmup_ratio: float = 0.05
    """Fraction of max_steps spent in linear warm-up."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy (BiomedGPT used 0.1, as the size configs do; the embedded default learns
    its short answers faster without it)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    """Autocast dtype; fp16 needs CUDA, 'no' trains in float32. Set it here or with `accelerate launch
    --mixed_precision`."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    freeze_embeddings: bool = False
    """Freeze the shared token embeddings (BiomedGPT fine-tuning did)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights (e.g. 0.9999); 0 disables."""
    save_every: int = 500
    """Save a resumable checkpoint every this many optimizer steps (and at the end)."""
    keep_last: int = 2
    """How many step checkpoints to keep."""
    resume: str | None = None
    """'auto' resumes from the newest complete checkpoint in output_dir, or give a checkpoint path."""
    log_every: int = 10
    """Log metrics every this many optimizer steps."""
    max_nonfinite_steps: int = 5
    """A non-finite loss skips the step; this many in a row stop the run."""
    compile: bool = False
    """Wrap the model with torch.compile (inductor). Off by default: on a 2-core CPU at base 384 px the first step
    took 4.4 minutes and the compiled step ran at 0.65x eager's speed; a second batch length compiles once more."""
    cpu_threads: int = 0
    """Intra-op threads per process on CPU hosts; 0 = the cores this process may use, shared among the processes
    on this machine. (A bare `accelerate launch` sets OMP_NUM_THREADS=1, which would leave cores idle.)"""

    def problems(self) -> list[str]:
        out = []
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "save_every", "keep_last",
                     "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                out.append(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            out.append(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.label_smoothing < 1:
            out.append(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.ema_decay < 1:
            out.append(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.max_grad_norm < 0:
            out.append(f"train.max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if not 0 <= self.seed < 2**32:
            out.append(f"train.seed must be in 0..2**32-1 (numpy's seed range), got {self.seed}")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            out.append(f"train.output_dir {self.output_dir} is a file; give a directory for the run's outputs")
        if self.cpu_threads < 0:
            out.append(f"train.cpu_threads must be >= 0 (0 = automatic), got {self.cpu_threads}")
        return out


PeftMethod = Literal["freeze", "full", "lora", "dora", "ia3", "prefix", "ptv2"]


@dataclass
class PeftArgs:
    """Per-component policy (MILE's ViT / JTM / Dec columns): vision = ResNet + image projection, encoder, decoder."""

    vision: PeftMethod = "full"
    """Vision component: freeze, full, lora, dora or ia3 (prefix/ptv2 have no meaning for the ResNet)."""
    encoder: PeftMethod = "full"
    """Text-image encoder: freeze, full, lora, dora, ia3, prefix or ptv2."""
    decoder: PeftMethod = "full"
    """Decoder: freeze, full, lora, dora, ia3, prefix or ptv2."""
    r: int = 8
    """LoRA/DoRA rank (MILE used 4 and 8)."""
    alpha: int = 32
    """LoRA/DoRA alpha."""
    dropout: float = 0.1
    """LoRA/DoRA dropout."""
    num_virtual_tokens: int = 10
    """Prefix / P-tuning v2 length."""
    prefix_projection: bool = True
    """Prefix tuning reparameterises the prefix through an MLP; P-tuning v2 (ptv2) never does."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """QLoRA: load frozen base linears in 4-bit NF4 or 8-bit through bitsandbytes, adapters on top."""
    quant_compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the 4-bit layers dequantise to for their matmul (QLoRA used bfloat16 on GPUs); the adapters' own dtype
    follows the launch (float32, or 16-bit under DeepSpeed bf16/fp16: scaling/adapters.py)."""
    double_quant: bool = True
    """NF4 only: also quantise the per-block scales (QLoRA's double quantisation, ~0.4 bit/param saved)."""
    vision_modules: list[str] = field(default_factory=lambda: ["conv1", "conv2", "conv3", "downsample.0", "image_proj"])
    """Vision LoRA/DoRA/IA3 targets (module-name suffixes): every ResNet conv and the image projection, the analogue
    of MILE's ViT LoRA on qkv/proj/fc1/fc2 + patch conv."""
    encoder_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Encoder LoRA/DoRA targets (suffixes): query and value projections, MILE's (peft's BERT default) choice."""
    decoder_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Decoder LoRA/DoRA targets (suffixes); matches self- and cross-attention, as MILE's did."""
    ia3_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "out_proj", "fc2"])
    """Encoder/decoder IA3 targets, MILE's (peft's BERT default key / value / output.dense, which by suffix hits the
    attention output and the FFN output): keys and values (self- and cross-attention) scaled on their output, the
    attention output projection and fc2 on their input."""
    ia3_feedforward_modules: list[str] = field(default_factory=lambda: ["out_proj", "fc2"])
    """IA3 targets scaled on their input rather than their output; a subset of ia3_modules (MILE: both output
    projections, as peft's BERT default treats output.dense). [fc2] alone is the IA3 paper's choice."""
    prefix_hidden_size: int | None = None
    """Hidden width of the prefix MLP (prefix with prefix_projection); None: the model width, as in MILE."""
    grid: str = "mile_tables1_4"
    """Sweep only: the named grid run when peft.sweep is empty (scaling.sweep.GRIDS): mile_table1..4 (MILE's LoRA,
    Prefix, IA3 and P-tuning v2 tables), mile_tables1_4 (all of them + global fine-tuning), mile_table5 (origin data,
    instruction data, origin then instruction), mile_tables6_7 (Tables 1-4 on instruction-format data),
    mile_table8 (global fine-tuning vs decoder-only PEFT), proxy (the CPU replication of the findings)."""
    sweep: list[str] = field(default_factory=list)
    """Sweep only: explicit rows, MILE's VISION-ENCODER-DECODER labels (F = freeze, T = full, or a method) with
    optional `:RANK`, `@nf4`/`@int8`, `/instruction` or `/origin+instruction` (the training data) and `/seedN`
    (train.seed + N - 1), e.g. [T-T-T, F-LoRA-LoRA:4, T-T-T/instruction, T-T-LoRA:4/seed2]; empty: peft.grid."""
    sweep_repeat: list[str] = field(default_factory=list)
    """Sweep only: rows of the sweep run a second time with train.seed + 1, so the replication report can measure
    seed noise and tell which differences between rows are real (names of rows the sweep lacks are left out)."""
    sweep_pretrain_steps: int = 0
    """Sweep only: full fine-tuning steps on the training sources other than VQA (all of them if VQA is the only
    task) before the rows, which then all start from that model and learn VQA (a stand-in for a pretrained
    checkpoint, as MILE adapted a pretrained MISS); 0: model.checkpoint/preset."""
    sweep_processes: int = 1
    """Sweep only: rows trained at the same time, each in its own process with train.cpu_threads (else the cores
    divided among them) threads; a row that starts from another's model waits for it. More than 1 only in a
    single-process launch (on a CPU host, 2 single-threaded rows on 2 cores beat one row on both)."""
    sweep_row: str | None = None
    """Sweep only, set by the sweep for each process it starts: run this one row (a label of peft.sweep) or
    `pretrain` (the common starting model) in this process and write its result; set it to rerun one row."""

    @property
    def enabled(self) -> bool:
        return any(m not in ("full",) for m in (self.vision, self.encoder, self.decoder)) or self.quantize != "none"

    def problems(self) -> list[str]:
        out = []
        if self.vision in ("prefix", "ptv2"):
            out.append(f"peft.vision={self.vision}: prefix methods apply to attention layers; use freeze, full, lora, "
                       "dora or ia3 for the vision component")
        if self.r < 1 or self.alpha < 1:
            out.append("peft.r and peft.alpha must be >= 1")
        if not 0 <= self.dropout < 1:
            out.append(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if self.num_virtual_tokens < 1:
            out.append(f"peft.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        for name in ("vision_modules", "encoder_modules", "decoder_modules", "ia3_modules"):
            if not getattr(self, name):
                out.append(f"peft.{name} is empty; list the module-name suffixes to adapt (see its default)")
        stray = sorted(set(self.ia3_feedforward_modules) - set(self.ia3_modules))
        if stray:
            out.append(f"peft.ia3_feedforward_modules {stray} are not in peft.ia3_modules; feed-forward modules must be "
                       "a subset of the IA3 targets")
        if self.sweep_pretrain_steps < 0:
            out.append(f"peft.sweep_pretrain_steps must be >= 0, got {self.sweep_pretrain_steps}")
        if self.sweep_processes < 1:
            out.append(f"peft.sweep_processes must be >= 1, got {self.sweep_processes}")
        from scaling.sweep import grid_problems  # late: the sweep module imports this one

        out += grid_problems(self)
        if self.quantize == "int8" and "dora" in (self.vision, self.encoder, self.decoder):
            out.append("peft.quantize=int8 with dora is refused: peft's DoRA on bitsandbytes 8-bit layers loses the "
                       "weight scales after a backward pass; use quantize=nf4 (QDoRA) or lora")
        if self.prefix_hidden_size is not None and self.prefix_hidden_size < 1:
            out.append(f"peft.prefix_hidden_size must be >= 1 or null, got {self.prefix_hidden_size}")
        if self.quantize != "none":
            full = [c for c in ("vision", "encoder", "decoder") if getattr(self, c) == "full"]
            if full:
                out.append(f"peft.quantize={self.quantize} freezes the base weights, but {', '.join(full)} "
                           "is set to full; use lora/dora/ia3/freeze there (QLoRA + full is refused)")
        return out


DecodingMode = Literal["generate", "constrained", "score"]
ScoreNormalize = Literal["trie", "vocab"]


@dataclass(frozen=True)
class Decoding:
    """How predictions are produced, in the names generate() reads: a task's BiomedGPT default or the eval.* keys."""

    mode: DecodingMode = "generate"
    """generate: free decoding; constrained: decoding limited to a candidate trie; score: rank every candidate by
    teacher-forced log-probability."""
    beam: int = 1
    """Beam size (1 = greedy)."""
    max_new_tokens: int = 16
    """Maximum answer tokens before EOS (fairseq's max_len_b; EOS may follow them, as in OFA's search)."""
    length_penalty: float = 1.0
    """Beam length penalty."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating n-grams of this size in free decoding (0 disables)."""
    score_chunk: int = 64
    """(sample, candidate) pairs per teacher-forced forward pass in score mode."""
    score_normalize: ScoreNormalize = "trie"
    """score mode: 'trie' renormalises each step's distribution over the tokens the trie allows (OFA), 'vocab' not."""

    def __post_init__(self):
        modes = typing.get_args(DecodingMode)
        if self.mode not in modes:
            raise ValueError(f"decoding mode must be one of {', '.join(modes)}, got {self.mode!r}")
        if self.score_normalize not in typing.get_args(ScoreNormalize):
            raise ValueError(f"score_normalize must be 'trie' or 'vocab', got {self.score_normalize!r}")

    def as_dict(self) -> dict:
        """The settings that matter for this mode, for reports."""
        keys = {"generate": ("beam", "max_new_tokens", "length_penalty", "no_repeat_ngram_size"),
                "constrained": ("beam", "max_new_tokens", "length_penalty"),
                "score": ("score_chunk", "score_normalize")}[self.mode]
        return {"mode": self.mode, **{k: getattr(self, k) for k in keys}}


@dataclass
class EvalArgs:
    """Evaluation and reports. The decoding keys carry the names of `Decoding`'s fields."""

    after_training: bool = True
    """Training recipes: evaluate the exported model on data.eval_sources (else the test split of the training
    sources) when training ends, and write the report into <train.output_dir>/eval."""
    mode: Literal["auto", DecodingMode] = "auto"
    """auto: each task's BiomedGPT decoding (VQA constrained greedy, captions beam 10, labels scored, ...; of the other
    eval.* decoding values only score_chunk and score_normalize then apply); generate: free decoding; constrained:
    decoding limited to a candidate trie; score: rank every candidate by teacher-forced log-probability."""
    checkpoints: list[str] = field(default_factory=list)
    """Checkpoint directories to evaluate side by side (empty: model.checkpoint, else the run's export)."""
    base_checkpoint: str | None = None
    """Base model directory for checkpoints that are PEFT adapters (dirs with adapter_config.json)."""
    output_dir: str | None = None
    """Where report.json/.md/.html and predictions/ go (None: <train.output_dir>/eval)."""
    batch_size: int = 32
    """Samples per generation batch."""
    beam: int = Decoding.beam
    """Beam size of an explicit mode (1 = greedy)."""
    max_new_tokens: int = Decoding.max_new_tokens
    """Maximum answer tokens before EOS of an explicit mode (fairseq's max_len_b)."""
    length_penalty: float = Decoding.length_penalty
    """Beam length penalty of an explicit mode."""
    no_repeat_ngram_size: int = Decoding.no_repeat_ngram_size
    """Forbid repeating n-grams of this size in eval.mode=generate (0 disables)."""
    max_samples: int | None = None
    """Evaluate at most this many samples per source (None: all)."""
    score_chunk: int = Decoding.score_chunk
    """(sample, candidate) pairs scored per forward pass in score mode."""
    score_normalize: ScoreNormalize = Decoding.score_normalize
    """score mode: trie renormalises each step over the tokens the candidate trie allows (OFA); vocab does not."""
    report_samples: int = 24
    """Samples shown in the report's table."""

    def problems(self) -> list[str]:
        out = []
        for name in ("batch_size", "beam", "max_new_tokens", "score_chunk"):
            if getattr(self, name) < 1:
                out.append(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.no_repeat_ngram_size < 0:
            out.append(f"eval.no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.max_samples is not None and self.max_samples < 1:
            out.append(f"eval.max_samples must be >= 1 or null, got {self.max_samples}")
        return out

    def decoding(self, task_default: Decoding) -> Decoding:
        """mode=auto: the task's BiomedGPT decoding with eval.score_chunk/score_normalize; else the eval.* values."""
        if self.mode == "auto":
            return dataclasses.replace(task_default, score_chunk=self.score_chunk, score_normalize=self.score_normalize)
        return Decoding(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Decoding)})


@dataclass
class LoggingArgs:
    """Console, log files and trackers."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """Console and log-file level."""
    progress: bool = True
    """Show rich progress bars on rank 0."""
    tensorboard: bool = False
    """Also log to tensorboard through accelerate's trackers (needs the tensorboard package)."""

    def problems(self) -> list[str]:
        return []


@dataclass
class Runtime:
    """What the launch environment provides; checked against the config before any work."""

    cuda: bool = False
    zero_stage: int = 0
    offload: bool = False
    num_processes: int = 1

    @classmethod
    def from_env(cls) -> Runtime:
        """Read the environment `accelerate launch` sets up (no process group is created)."""
        import torch

        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        offload_vars = ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0"))
        offload = any(os.environ.get(v, "none") not in ("none", "") for v in offload_vars)
        ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if deepspeed and ds_file and Path(ds_file).is_file():  # accelerate YAMLs that point at a DeepSpeed JSON
            import json

            zero = json.loads(Path(ds_file).read_text()).get("zero_optimization", {})
            stage = int(zero.get("stage", 0))
            offload = any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))
        return cls(
            cuda=torch.cuda.is_available(),
            zero_stage=stage if deepspeed else 0,
            offload=offload,
            num_processes=int(os.environ.get("WORLD_SIZE", "1")),
        )


@dataclass
class Config:
    """The whole run: one section per concern."""

    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    peft: PeftArgs = field(default_factory=PeftArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)

    _source = None  # the YAML file this config came from, named in error messages (not a field)

    def problems(self, runtime: Runtime | None = None) -> list[str]:
        """Every problem of every section plus the cross-section and launch-environment checks."""
        out = [p for section in SECTIONS for p in getattr(self, section).problems()]
        out += self.non_finite_problems()
        if self.train.resume is not None:
            from scaling.training.checkpoint import resume_problems  # late: loads torch

            out += resume_problems(self)
        prefix = [c for c in ("encoder", "decoder") if getattr(self.peft, c) in ("prefix", "ptv2")]
        if prefix and self.train.gradient_checkpointing:
            out.append(f"peft prefix/ptv2 on {', '.join(prefix)} cannot be combined with "
                       "train.gradient_checkpointing (recomputation would drop the prefix cache); disable one")
        if runtime is not None:
            out += _runtime_problems(self, runtime)
        return out

    def non_finite_problems(self) -> list[str]:
        """NaN and infinity pass every range check written as a comparison (lr=nan, max_grad_norm=nan)."""
        values = {f"{s}.{k}": v for s in SECTIONS for k, v in vars(getattr(self, s)).items()}
        return [f"{key} must be a finite number, got {value}" for key, value in values.items()
                if isinstance(value, float) and not math.isfinite(value)]

    def validate(self, runtime: Runtime | None = None, source: str | None = None) -> Config:
        """Raise ConfigError with every problem at once; return self when valid."""
        problems = self.problems(runtime)
        if problems:
            raise ConfigError(problems, source or self._source)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = ("model", "data", "train", "peft", "eval", "logging")

QLORA_ZERO_STAGES = (0, 1, 2)
"""Launches QLoRA (peft.quantize) is accepted under: no DeepSpeed, ZeRO-1, ZeRO-2 (verified with 2 CPU ranks in
tests/recipes/test_peft_zero3.py). ZeRO-3 is refused: the base linears are quantised from the full weights, which a
zero3_init_flag launch never materialises, and sharded 4-bit weights are unverified on GPUs."""


def _runtime_problems(cfg: Config, rt: Runtime) -> list[str]:
    out = []
    if cfg.train.mixed_precision == "fp16" and not rt.cuda:
        out.append("train.mixed_precision=fp16 needs CUDA (fp16 autocast on CPU is slow and numerically unsafe); "
                   "use bf16 on CPU")
    if cfg.train.ema_decay > 0 and rt.zero_stage == 3:
        out.append("train.ema_decay > 0 keeps full fp32 weight averages on every rank, which ZeRO-3 shards away; "
                   "set train.ema_decay=0 or use ZeRO-2")
    if rt.offload and rt.zero_stage == 0:
        out.append("CPU offload is a DeepSpeed ZeRO feature: pick zero2/zero3 offload configs, not plain DDP")
    if cfg.peft.quantize != "none" and rt.zero_stage not in QLORA_ZERO_STAGES:
        out.append(f"peft.quantize={cfg.peft.quantize} combines with DDP and ZeRO-1/2 only, not ZeRO-{rt.zero_stage}: "
                   "use accelerate_configs/zero2.yaml or no DeepSpeed")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Loading: YAML + overrides → typed dataclasses


def parse_cli(argv: list[str] | None, description: str, runtime: Runtime | None = None) -> tuple[Config, str | None]:
    """A recipe's command line: `--config FILE` and dotted `key=value` overrides, in any order."""
    require_supported_versions()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="recipe YAML (recipes/configs/...); omit for the defaults")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100")
    args = parser.parse_intermixed_args(argv)
    return load_config(args.config, args.overrides, runtime), args.config


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                runtime: Runtime | None = None) -> Config:
    """Build a Config from a YAML file (optional) and dotted `key=value` overrides; key and type errors are reported
    together with every validation problem (against `runtime` when given) of the keys that did parse."""
    raw: dict[str, Any] = {}
    source = str(path) if path else None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"], source)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError([f"{path} is not valid YAML: {err}"], source) from None
        if not isinstance(raw, dict):
            raise ConfigError([f"{path} must hold a mapping of sections, got {type(raw).__name__}"], source)
    problems: list[str] = []
    for item in overrides:
        _apply_override(raw, item, problems)
    cfg = _build(Config, raw, "", problems)
    if problems:
        raise ConfigError(problems + cfg.problems(runtime), source)
    cfg._source = source
    return cfg


def _apply_override(raw: dict, item: str, problems: list[str]) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        problems.append(f"override {item!r} is not of the form section.key=value")
        return
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            problems.append(f"override {item!r}: {part} is not a section")
            return
    node[leaf] = yaml.safe_load(text) if text.strip() else None


def _build(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from a mapping, collecting unknown-key and type problems."""
    if not isinstance(raw, dict):
        problems.append(f"{where or 'config'} must be a mapping, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            problems.append(f"unknown key {dotted!r}{_suggest(str(key), names, where)}")
            continue
        ok, coerced = _coerce(value, hints[key], dotted, problems)
        if ok:
            kwargs[key] = coerced
    return cls(**kwargs)


def _suggest(key: str, names: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {(where + '.' if where else '') + close[0]!r}?"
    return f"; valid keys: {', '.join(names)}"


def _coerce(value: Any, hint: Any, where: str, problems: list[str]) -> tuple[bool, Any]:
    """Check `value` against type `hint`; return (ok, value converted where lossless)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, problems) if len(inner) == 1 else (True, value)
    if origin is Literal:
        value = _boolean_as_word(value, args)
        if value in args:
            return True, value
        problems.append(f"{where} must be one of {', '.join(map(str, args))}; got {value!r}")
        return False, None
    if dataclasses.is_dataclass(hint):
        return True, _build(hint, value, where, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where} must be a list, got {type(value).__name__} {value!r}")
            return False, None
        items = [_coerce(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return True, value
        problems.append(f"{where} must be a mapping, got {type(value).__name__} {value!r}")
        return False, None
    if hint is Any:
        return True, value
    return _coerce_scalar(value, hint, where, problems)


_BOOLEAN_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _boolean_as_word(value: Any, choices: tuple) -> Any:
    """YAML 1.1 reads no/off/yes/on as booleans; for a choice among words (train.mixed_precision=no) take the word
    back."""
    if isinstance(value, bool):
        words = [word for word in _BOOLEAN_WORDS[value] if word in choices]
        if len(words) == 1:
            return words[0]
    return value


def _coerce_scalar(value: Any, hint: type, where: str, problems: list[str]) -> tuple[bool, Any]:
    if hint is bool:
        if isinstance(value, bool):
            return True, value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return True, float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return True, value
    problems.append(f"{where} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return False, None


# ---------------------------------------------------------------------------------------------------------------------
# Saving and describing


def save_config(cfg: Config, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config next to the run's outputs (rank 0 only; callers check)."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)
    return path
