"""Throughput instruments: the toolkit's training loop and a bare torch loop timed on the same batches, FLOPs per
step (by part, on the meta device) and MFU against a dense-matmul peak measured on the same device, data-loader and
generation speed, transformers' BART of the same dimensions side by side, torch.compile against eager.

    shape = SHAPES["vqa"]                                         # BiomedGPT-Base VQA fine-tuning: 384 px, a question
    batches = synthetic_batches(model.config, shape, device)
    peak = matmul_peak(torch.bfloat16, device)                    # FLOP/s, this run's ceiling for MFU
    flops = step_flops(model.config, shape)                       # {"total", "resnet", "encoder", "decoder", "lm_head"}
    toolkit = ToolkitLoop(cfg, accelerator, prepare_for_training(accelerator, model, cfg), batches)
    bare = BareLoop(bare_model, batches, "bf16", device)
    seconds = toolkit.run(steps), bare.run(steps)
    against_bart(model.config, SHAPES["text"], "bf16", device, steps, repeats, new_tokens)

Every timer synchronises the device before reading the clock, so CUDA's queued kernels count where they run. Ratios
come from loops timed alternately in one process, so a shared machine's load falls on both sides alike.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import BartConfig, BartForConditionalGeneration

from scaling.config import Decoding
from scaling.evaluation.generate import CandidateSet, CandidateTrie, search_arguments
from scaling.models.biomedgpt import BiomedGPTForConditionalGeneration
from scaling.training.loop import train

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BatchShape:
    """A micro-batch with every text slot filled (no padding) and one image per sample (image_size 0: text only)."""

    batch: int
    image_size: int
    src_len: int
    tgt_len: int

    @property
    def image_tokens(self) -> int:
        """Patches per image: the ResNet downsamples by 16."""
        return (self.image_size // 16) ** 2


SHAPES = {
    # BiomedGPT-Base VQA fine-tuning (VQA-RAD at 384 px): 576 patches, a question, a short answer
    "vqa": BatchShape(batch=4, image_size=384, src_len=32, tgt_len=16),
    # captioning as OFA and BiomedGPT fine-tune it (480 px): 900 patches, the short prompt, a report-length target
    "caption": BatchShape(batch=4, image_size=480, src_len=16, tgt_len=64),
    # the text-only path, as compared with transformers' BART
    "text": BatchShape(batch=8, image_size=0, src_len=256, tgt_len=32),
}


# ---------------------------------------------------------------------------------------------------------------------
# Device, dtype, batches


def cpu_oversubscribed() -> bool:
    """A CPU-only host whose 1-minute load average exceeds its cores (other jobs share them)."""
    return not torch.cuda.is_available() and os.getloadavg()[0] > (os.cpu_count() or 1)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the intra-op thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(precision: str, device: torch.device):
    """The autocast context accelerate uses for `precision` (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def synthetic_batches(config, shape: BatchShape, device: torch.device, count: int = 2) -> list[dict]:
    """`count` fixed random batches of `shape` on `device` (seeded: every run draws the same)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        batch = {
            "input_ids": torch.randint(4, config.vocab_size, (shape.batch, shape.src_len), generator=generator),
            "attention_mask": torch.ones(shape.batch, shape.src_len, dtype=torch.long),
            "labels": torch.randint(4, config.vocab_size, (shape.batch, shape.tgt_len), generator=generator),
        }
        if shape.image_size:
            size = shape.image_size
            batch["pixel_values"] = torch.randn(shape.batch, 3, size, size, generator=generator)
            batch["patch_masks"] = torch.ones(shape.batch, dtype=torch.bool)
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs and the matmul ceiling


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 1.0) -> float:
    """Dense square-matmul FLOP/s of `dtype` on `device` (the best of a few timed runs)."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, AMX/tensor-core initialisation
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def counted_flops(work) -> int:
    """FLOPs (matmuls, convolutions, attention) that FlopCounterMode counts while `work()` runs."""
    counter = FlopCounterMode(display=False)
    with counter:
        work()
    return counter.get_total_flops()


def step_flops(config, shape: BatchShape) -> dict[str, int]:
    """FLOPs of one training forward + backward, in total and by part: the ResNet, the encoder layers (with the
    embeddings and position biases), the decoder and the LM head (the vocabulary projection and its gradients).

    Counted on the meta device, so any size costs neither memory nor time. Each part is its own forward + backward,
    run as in the full step; the decoder is what remains of the total.
    """
    with torch.device("meta"):
        model = BiomedGPTForConditionalGeneration(config).train()
    meta = torch.device("meta")
    batch = synthetic_batches(config, shape, meta, count=1)[0]
    encoder = model.get_encoder()
    # Every synthetic position is labelled, so projecting all of them is loss_step's work without its selection of
    # labelled rows (a data-dependent shape, which meta tensors cannot have).
    total = counted_flops(lambda: model(**batch).loss.backward())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    encoder_total = counted_flops(lambda: encoder(**inputs).last_hidden_state.sum().backward())
    resnet = 0
    if "pixel_values" in batch:
        resnet = counted_flops(lambda: encoder.embed_images(batch["pixel_values"]).sum().backward())
    hidden = torch.empty(batch["labels"].numel(), config.d_model, device=meta, requires_grad=True)
    head = model.get_output_embeddings()
    lm_head = counted_flops(lambda: F.cross_entropy(head(hidden), batch["labels"].flatten()).backward())
    return {"total": total, "resnet": resnet, "encoder": encoder_total - resnet,
            "decoder": total - encoder_total - lm_head, "lm_head": lm_head}


# ---------------------------------------------------------------------------------------------------------------------
# Timed training loops


class FixedBatches:
    """A BatchStream stand-in for the training loop: the same prepared batches in turn."""

    images_skipped = 0  # prepared tensors: no image to fail decoding

    def __init__(self, batches: list[dict]):
        self.batches, self.position = batches, 0

    def next_batch(self, device: torch.device) -> dict:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}


class ToolkitLoop:
    """The library's training loop (`scaling.training.loop.train`) on fixed batches, continued `steps` at a time."""

    def __init__(self, cfg, accelerator, prepared, batches: list[dict]):
        self.cfg, self.accelerator, self.prepared = cfg, accelerator, prepared
        self.stream, self.step = FixedBatches(batches), 0

    def run(self, steps: int) -> float:
        """Run `steps` more optimizer steps; seconds taken."""
        self.cfg.train.max_steps = self.step + steps
        synchronize(self.accelerator.device)
        start = time.perf_counter()
        self.step = train(self.cfg, self.accelerator, self.prepared, self.stream, self.step)
        synchronize(self.accelerator.device)
        return time.perf_counter() - start


def bare_loss(model, batch: dict) -> torch.Tensor:
    """The training loss as a plain script would ask for it (only the labelled positions projected)."""
    return model(**batch, return_logits=False).loss


def transformers_loss(model, batch: dict) -> torch.Tensor:
    """The loss of a transformers seq2seq model given labels."""
    return model(**batch).loss


class BareLoop:
    """The same work without the toolkit, written independently of it on purpose: autocast forward, backward,
    clipping, AdamW, zero_grad. AdamW is torch's fused kernel on CUDA and CPU, as in the toolkit, so the overhead
    compares like with like. `loss` turns (model, batch) into the loss (another model family needs another call)."""

    def __init__(self, model, batches: list[dict], precision: str, device: torch.device, loss=bare_loss):
        self.model, self.batches, self.precision, self.device = model.train(), batches, precision, device
        self.loss = loss
        fused = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **fused)
        self.position = 0

    def run(self, steps: int) -> float:
        """Run `steps` more optimizer steps; seconds taken."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            with autocast(self.precision, self.device):
                loss = self.loss(self.model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - start


def alternating(loops: dict, steps: int, repeats: int, before_each=None) -> dict[str, list[float]]:
    """Seconds per step of each loop, `repeats` times, the loops taking turns (they share the machine's noise);
    `before_each()` runs before every turn of the loops."""
    times = {name: [] for name in loops}
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        for name, loop in loops.items():
            times[name].append(loop.run(steps) / steps)
    return times


def step_metrics(results: dict, toolkit_s: float, bare_s: float) -> dict:
    """Throughput, MFU and overhead from the fastest repeat of each loop (`results` holds the shape, the FLOPs per
    step and the matmul peak)."""
    shape = results["shape"]
    image_tokens = shape["batch"] * shape["image_tokens"]
    text_tokens = shape["batch"] * (shape["src_len"] + shape["tgt_len"])
    flops = results["flops_per_step"]
    return {
        "step_time_s": toolkit_s,
        "bare_step_time_s": bare_s,
        "samples_per_s": shape["batch"] / toolkit_s,
        "image_tokens_per_s": image_tokens / toolkit_s,
        "text_tokens_per_s": text_tokens / toolkit_s,
        "tokens_per_s": (image_tokens + text_tokens) / toolkit_s,
        "achieved_flops": flops / toolkit_s,
        "mfu_of_matmul_peak": flops / toolkit_s / results["matmul_peak_flops"],
        "bare_mfu_of_matmul_peak": flops / bare_s / results["matmul_peak_flops"],
        "toolkit_overhead": toolkit_s / bare_s - 1.0,
    }


def compiled_vs_eager(model, batches: list[dict], precision: str, device: torch.device, steps: int,
                      repeats: int) -> dict:
    """torch.compile (inductor) against eager, bare loops on the same batches: the first compiled step (compilation
    included), then the fastest of alternating repeats."""
    eager = BareLoop(model, batches, precision, device)
    compiled = BareLoop(torch.compile(model), batches, precision, device)
    eager.run(1)
    first_step = compiled.run(1)
    compiled.run(1)  # the second batch may compile again
    times = alternating({"eager": eager, "compiled": compiled}, steps, repeats)
    return {"compile_first_step_s": first_step, "compile_eager_step_time_s": min(times["eager"]),
            "compile_step_time_s": min(times["compiled"]),
            "compile_speedup": min(times["eager"]) / min(times["compiled"])}


# ---------------------------------------------------------------------------------------------------------------------
# Data loader


def loader_throughput(shape: BatchShape, workers: int, batches: int, step_samples_per_s: float) -> dict:
    """Samples/s of the recipes' BatchStream over synthetic records (mixture, image decode + augment, tokenize, pad):
    with `workers` image threads, and with the images transformed in the calling thread."""
    from scaling.config import SourceArgs, load_config
    from scaling.data.loading import load_sources
    from scaling.data.synthetic import generate_synthetic
    from scaling.models.biomedgpt.tokenization import train_bpe_tokenizer
    from scaling.training.batches import BatchStream
    from scaling.training.run import tokenizer_corpus

    # The fixed benchmark shape truncates prompts on purpose; the Collator's truncation warnings are noise here.
    logging.getLogger("scaling.data.collate").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_synthetic(Path(tmp) / "synthetic", n_images=48, seed=0, image_size=shape.image_size)
        sources = [SourceArgs(name=s.loader, path=str(s.path), options=dict(s.options)) for s in data.sources.values()]
        train_data = load_sources(sources, load_config(None, []).data)
        tokenizer = train_bpe_tokenizer(tokenizer_corpus(train_data))

        def stream(threads: int) -> BatchStream:
            cfg = load_config(None, [f"data.num_workers={threads}", f"train.batch_size={shape.batch}",
                                     f"data.max_src_len={shape.src_len}", f"data.max_tgt_len={shape.tgt_len}"])
            return BatchStream(train_data, cfg, tokenizer, shape.image_size, rank=0, world_size=1)

        threaded = samples_per_s(stream(workers), batches, shape.batch)
        in_process = samples_per_s(stream(0), batches, shape.batch)
    return {"loader_samples_per_s": threaded, "loader_in_process_samples_per_s": in_process,
            "loader_workers": workers, "loader_vs_step": threaded / step_samples_per_s}


def samples_per_s(stream, batches: int, batch_size: int) -> float:
    """Samples/s over `batches` batches after the first (thread start-up excluded); the stream is closed after."""
    cpu = torch.device("cpu")
    stream.next_batch(cpu)
    start = time.perf_counter()
    for _ in range(batches):
        stream.next_batch(cpu)
    elapsed = time.perf_counter() - start
    stream.close()
    return batches * batch_size / elapsed


# ---------------------------------------------------------------------------------------------------------------------
# Generation


def greedy(new_tokens: int) -> dict:
    """generate() settings for greedy decoding of exactly `new_tokens` tokens."""
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "num_beams": 1}


def timed(work, precision: str, device: torch.device):
    """(result, seconds) of `work()` under no_grad and autocast, as the evaluation runner runs the model: autocast
    then casts each weight once per call (under inference_mode it would cast every weight again at every step)."""
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast(precision, device):
        result = work()
    synchronize(device)
    return result, time.perf_counter() - start


def timed_generate(model, inputs: dict, precision: str, device: torch.device, **settings) -> float:
    """Seconds of one generate() call."""
    return timed(lambda: model.generate(**inputs, **settings), precision, device)[1]


def prompt_inputs(config, batch: dict, prompts: int, device: torch.device) -> dict:
    """`prompts` rows of the batch's first sample, each with its own random text (so no row repeats another)."""
    inputs = {k: v[:1].repeat(prompts, *[1] * (v.dim() - 1)) for k, v in batch.items() if k != "labels"}
    inputs["input_ids"] = torch.randint(4, config.vocab_size, inputs["input_ids"].shape, device=device)
    return inputs


def rows(inputs: dict, index: int) -> dict:
    """Sample `index` of the inputs, as a batch of one."""
    return {k: v[index:index + 1] for k, v in inputs.items()}


def generation_throughput(model, batch: dict, precision: str, prompts: int, new_tokens: int,
                          device: torch.device, repeats: int = 2) -> dict:
    """Greedy decoding of `new_tokens` tokens for `prompts` prompts: with and without the KV cache, and together vs
    one by one. The encoder, which runs once per prompt either way, is timed apart, so the figures are given for
    whole generate() calls (encoder + decoding) and for decoding alone. Each figure is the fastest of `repeats`
    rounds, every round timing all of them in turn (so they share the machine's noise)."""
    model.eval()
    inputs = prompt_inputs(model.config, batch, prompts, device)
    encoder = model.get_encoder()
    settings = greedy(new_tokens)

    def encoded(sample_inputs: dict):
        return timed(lambda: encoder(**sample_inputs), precision, device)

    def decode(encoder_outputs, **extra) -> float:
        # a fresh output object per call: what one generate() call derives from its encoder output starts afresh
        return timed_generate(model, {"encoder_outputs": type(encoder_outputs)(**encoder_outputs)}, precision, device,
                              **settings, **extra)

    def one_round() -> dict[str, float]:
        batch_encoded, encoder_s = encoded(inputs)
        seconds = {"encoder": encoder_s, "cached": decode(batch_encoded, use_cache=True),
                   "uncached": decode(batch_encoded, use_cache=False), "one_encoder": 0.0, "one_decode": 0.0}
        for i in range(prompts):
            sample_encoded, sample_encoder_s = encoded(rows(inputs, i))
            seconds["one_encoder"] += sample_encoder_s
            seconds["one_decode"] += decode(sample_encoded, use_cache=True)
        return seconds

    timed_generate(model, rows(inputs, 0), precision, device, **settings)  # warm-up
    rounds = [one_round() for _ in range(repeats)]
    s = {key: min(r[key] for r in rounds) for key in rounds[0]}
    model.train()
    return {
        "generation_tokens_per_s": prompts * new_tokens / (s["encoder"] + s["cached"]),
        "generation_encoder_share": s["encoder"] / (s["encoder"] + s["cached"]),
        "kv_cache_speedup": (s["encoder"] + s["uncached"]) / (s["encoder"] + s["cached"]),
        "kv_cache_decode_speedup": s["uncached"] / s["cached"],
        "batched_generation_speedup": (s["one_encoder"] + s["one_decode"]) / (s["encoder"] + s["cached"]),
        # the most batching could give if the batched decoding took no time: the encoder's work grows with the batch
        "batched_generation_bound": (s["one_encoder"] + s["one_decode"]) / s["encoder"],
        "batched_decode_speedup": s["one_decode"] / s["cached"],
        "generation_times_s": rounds,
    }


def candidate_answers(vocab_size: int, eos_token_id: int, count: int, seed: int = 0) -> CandidateSet:
    """`count` random answers of 1-4 tokens, each ending in EOS (500: about VQA-RAD's answer list)."""
    generator = torch.Generator().manual_seed(seed)
    token_ids = []
    for _ in range(count):
        length = int(torch.randint(1, 5, (1,), generator=generator))
        token_ids.append(torch.randint(4, vocab_size, (length,), generator=generator).tolist() + [eos_token_id])
    return CandidateSet([str(i) for i in range(count)], token_ids, CandidateTrie(token_ids))


def search_throughput(model, batch: dict, precision: str, prompts: int, new_tokens: int, beams: int,
                      device: torch.device) -> dict:
    """Seconds per prompt, `prompts` prompts together: beam search of `new_tokens` tokens, and decoding constrained
    to a trie of 500 short answers as the evaluation's constrained mode runs it (same beam size)."""
    model.eval()
    inputs = prompt_inputs(model.config, batch, prompts, device)
    beam_s = timed_generate(model, inputs, precision, device, **{**greedy(new_tokens), "num_beams": beams})
    candidates = candidate_answers(model.config.vocab_size, model.config.eos_token_id, 500)
    ids = SimpleNamespace(pad_token_id=model.config.pad_token_id, eos_token_id=model.config.eos_token_id)
    search = search_arguments(Decoding(mode="constrained", beam=beams, max_new_tokens=new_tokens), ids, 1,
                              [candidates] * prompts)
    constrained_s = timed_generate(model, inputs, precision, device, **search)
    model.train()
    return {"search_beams": beams, "beam_search_s_per_prompt": beam_s / prompts,
            "constrained_candidates": len(candidates.answers), "constrained_s_per_prompt": constrained_s / prompts}


# ---------------------------------------------------------------------------------------------------------------------
# Side by side with transformers' BART


def bart_twin(config) -> BartForConditionalGeneration:
    """transformers' BART with this model's transformer dimensions (width, depth, heads, FFN, activation, dropout,
    positions, vocabulary, tied embeddings, SDPA attention): the reference for the text-only path."""
    bart = BartConfig(
        vocab_size=config.vocab_size, d_model=config.d_model, encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers, encoder_attention_heads=config.encoder_attention_heads,
        decoder_attention_heads=config.decoder_attention_heads, encoder_ffn_dim=config.encoder_ffn_dim,
        decoder_ffn_dim=config.decoder_ffn_dim, activation_function=config.activation_function,
        dropout=config.dropout, attention_dropout=config.attention_dropout,
        activation_dropout=config.activation_dropout, max_position_embeddings=config.max_positions,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        decoder_start_token_id=config.decoder_start_token_id, forced_eos_token_id=None, scale_embedding=False,
        tie_word_embeddings=True)
    bart._attn_implementation = "sdpa"
    return BartForConditionalGeneration(bart)


def against_bart(config, shape: BatchShape, precision: str, device: torch.device, steps: int, repeats: int,
                 new_tokens: int) -> dict:
    """This model's text-only path against BART of the same dimensions, in one run on the same batches: training
    steps (bare loops, taking turns), FLOPs per step (counted on the warm-up step), cached greedy generation of
    `new_tokens` tokens (taking turns), and this model's uncached decoding."""
    torch.manual_seed(0)
    config = copy.deepcopy(config)
    config.label_smoothing = 0.0  # BART's loss has none
    models = {"ours": BiomedGPTForConditionalGeneration(config).to(device), "bart": bart_twin(config).to(device)}
    batches = synthetic_batches(config, shape, device)
    loops = {"ours": BareLoop(models["ours"], batches, precision, device),
             "bart": BareLoop(models["bart"], batches, precision, device, loss=transformers_loss)}
    flops = {name: counted_flops(lambda loop=loop: loop.run(1)) for name, loop in loops.items()}
    steps_s = alternating(loops, steps, repeats)
    inputs = {k: v for k, v in batches[0].items() if k in ("input_ids", "attention_mask")}
    generation = {name: [] for name in models}
    for model in models.values():
        model.eval()
        timed_generate(model, rows(inputs, 0), precision, device, **greedy(new_tokens))  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            generation[name].append(timed_generate(model, inputs, precision, device, **greedy(new_tokens)))
    uncached = timed_generate(models["ours"], inputs, precision, device, **greedy(new_tokens), use_cache=False)
    ours_step, bart_step = min(steps_s["ours"]), min(steps_s["bart"])
    ours_generation, bart_generation = min(generation["ours"]), min(generation["bart"])
    return {
        "bart_shape": {"batch": shape.batch, "src_len": shape.src_len, "tgt_len": shape.tgt_len,
                       "new_tokens": new_tokens},
        "bart_parameters": sum(p.numel() for p in models["bart"].parameters()),
        "bart_ours_flops_per_step": flops["ours"], "bart_flops_per_step": flops["bart"],
        "bart_ours_step_time_s": ours_step, "bart_step_time_s": bart_step, "bart_step_ratio": ours_step / bart_step,
        "bart_ours_generation_s": ours_generation, "bart_generation_s": bart_generation,
        "bart_generation_ratio": ours_generation / bart_generation,
        "bart_ours_kv_cache_speedup": uncached / ours_generation,
        "bart_times_s": {"step": steps_s, "generation": generation},
    }
