"""Batched prediction with BiomedGPT's three evaluation modes, on one process or sharded across ranks.

- generate: free decoding through `model.generate()` with the KV cache, searching like OFA's fairseq
  SequenceGenerator (`ofa_beam_search_kwargs`: greedy or beam, no empty answer, at most max_new_tokens answer tokens
  and then EOS with its own log-probability, length penalty, no-repeat n-gram, finished after `beam` hypotheses).
- constrained: the same decoding, but a `TrieConstraint` logits processor lets only token sequences of the candidate
  answers come out; EOS is allowed only where a candidate ends (OFA's `constraint_trie`).
- score: every candidate is scored by teacher forcing (summed log-probability of its tokens and EOS), in chunks, and
  the best one is taken (OFA's `eval_vqa_gen` "all-candidate" mode). The encoder runs once per sample; its output is
  reused for all of the sample's candidates.

Candidates are tokenised exactly like training targets (`Task.target`: leading space, the task's normalisation),
followed by EOS. In beam search transformers applies logits processors to normalised log-probabilities, so the
constraint there matches OFA's zero-shot behaviour (masks after normalisation); greedy takes the same argmax either way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

from scaling.config import Decoding
from scaling.data.records import Record
from scaling.data.tasks import Task
from scaling.models.biomedgpt.generation import EOSAtMaxLength, beam_ranking, ofa_beam_search_kwargs

# ---------------------------------------------------------------------------------------------------------------------
# Candidates and the trie


class CandidateTrie:
    """Prefix tree over candidate token sequences (each ending in EOS): which tokens may follow a prefix."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        self.root: dict[int, dict] = {}
        for sequence in sequences:
            node = self.root
            for token in sequence:
                node = node.setdefault(int(token), {})

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that extend `prefix` toward some candidate; empty once a candidate is complete or left."""
        node = self.root
        for token in prefix:
            node = node.get(int(token))
            if node is None:
                return []
        return list(node)


@dataclass
class CandidateSet:
    """One list of candidate answers, tokenised, with its trie and the way back from tokens to answers."""

    answers: list[str]
    token_ids: list[list[int]]
    trie: CandidateTrie

    def answer_for(self, tokens: Sequence[int]) -> str | None:
        """The candidate whose token sequence (with EOS) `tokens` is, or None."""
        return self._by_tokens.get(tuple(tokens))

    def __post_init__(self):
        self._by_tokens = {tuple(t): a for t, a in zip(self.token_ids, self.answers, strict=True)}


def build_candidate_set(task: Task, record: Record, answers: Sequence[str], tokenizer) -> CandidateSet:
    """Tokenise answers as the task formats targets (leading space, normalisation) and append EOS.

    Answers that format to the same text (e.g. "Yes" and "yes" for VQA) are merged, keeping the first spelling.
    """
    unique: dict[str, str] = {}
    for answer in answers:
        unique.setdefault(task.target(dataclasses.replace(record, target=answer, targets=[answer])), answer)
    texts = list(unique)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    token_ids = [list(ids) + [tokenizer.eos_token_id] for ids in encoded]
    return CandidateSet(list(unique.values()), token_ids, CandidateTrie(token_ids))


class CandidateCache:
    """Builds each distinct candidate list once (a VQA dataset shares one list of hundreds of answers)."""

    def __init__(self, task: Task, tokenizer):
        self.task, self.tokenizer = task, tokenizer
        self._sets: dict[tuple[str, ...], CandidateSet] = {}

    def __call__(self, record: Record) -> CandidateSet:
        answers = self.task.candidates(record)
        if not answers:
            raise ValueError(f"{record.source or 'dataset'}: record {record.id!r} (index {record.index}) has no "
                             f"candidate answers, which constrained and score modes need; use eval.mode=generate "
                             "or a source that provides an answer list")
        key = tuple(answers)
        if key not in self._sets:
            self._sets[key] = build_candidate_set(self.task, record, answers, self.tokenizer)
        return self._sets[key]


class TrieConstraint(LogitsProcessor):
    """Masks every token that does not continue a candidate of the row's sample (rows are sample × beam)."""

    def __init__(self, tries: Sequence[CandidateTrie], num_beams: int, prompt_length: int, pad_token_id: int):
        self.tries, self.num_beams = list(tries), num_beams
        self.prompt_length, self.pad_token_id = prompt_length, pad_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, -math.inf)
        for row, tokens in enumerate(input_ids[:, self.prompt_length:].tolist()):
            allowed = self.tries[row // self.num_beams].allowed(tokens)
            # a finished (or padded) row may only continue with padding, which generate() discards
            mask[row, allowed or [self.pad_token_id]] = 0.0
        return scores + mask


# ---------------------------------------------------------------------------------------------------------------------
# Generation


ENCODER_KEYS = ("input_ids", "attention_mask", "pixel_values", "patch_masks")


def encoder_inputs(batch: dict, rows: Sequence[int] | None = None) -> dict:
    """The batch entries the encoder reads (a collated batch also carries targets and ids), optionally some rows."""
    inputs = {k: batch[k] for k in ENCODER_KEYS if batch.get(k) is not None}
    return inputs if rows is None else {k: v[list(rows)] for k, v in inputs.items()}


def decoder_prefixes(batch: dict, start_token: int) -> list[list[int]]:
    """Each sample's decoder prefix: `<s>` alone, or `<s> prompt` under prompt_type=prev_output.

    The collator marks prev_output prompts with leading -100 labels and writes the prompt into decoder_input_ids,
    so the prefix is read off the batch; batches without decoder inputs start from the decoder start token.
    """
    if batch.get("decoder_input_ids") is None or batch.get("labels") is None:
        return [[start_token] for _ in range(batch["input_ids"].shape[0])]
    prefixes = []
    for inputs, labels in zip(batch["decoder_input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        prompt_length = next((i for i, label in enumerate(labels) if label != -100), len(labels))
        prefixes.append(inputs[:1 + prompt_length])
    return prefixes


def _groups_by_length(prefixes: Sequence[Sequence[int]]) -> list[list[int]]:
    """Rows grouped by prefix length: generate() needs one decoder length per call, and positions start at 0."""
    groups: dict[int, list[int]] = {}
    for row, prefix in enumerate(prefixes):
        groups.setdefault(len(prefix), []).append(row)
    return [groups[length] for length in sorted(groups)]


def generate_batch(model, tokenizer, batch: dict, decoding: Decoding, candidate_sets: Sequence[CandidateSet] | None,
                   synced_gpus: bool = False, sync_count: Callable[[int], int] | None = None) -> list[str]:
    """Decode one batch with `model.generate()`; constrained when candidate sets are given (one per sample).

    Samples with decoder prefixes of different lengths (prev_output) are decoded in one call per length;
    `sync_count` (max over ranks) makes every rank run as many calls, since synced generation is collective.
    """
    prefixes = decoder_prefixes(batch, model.config.decoder_start_token_id)
    groups = _groups_by_length(prefixes)
    total = sync_count(len(groups)) if sync_count else len(groups)
    answers: list[str | None] = [None] * len(prefixes)
    for i in range(total):
        rows = groups[min(i, len(groups) - 1)]  # extra calls repeat the last group for the slower ranks' sake
        sets = [candidate_sets[r] for r in rows] if candidate_sets is not None else None
        texts = _generate_rows(model, tokenizer, encoder_inputs(batch, rows), [prefixes[r] for r in rows], decoding,
                               sets, synced_gpus)
        if i < len(groups):
            for row, text in zip(rows, texts, strict=True):
                answers[row] = text
    return answers


def _generate_rows(model, tokenizer, inputs: dict, prefixes: list[list[int]], decoding: Decoding,
                   candidate_sets: Sequence[CandidateSet] | None, synced_gpus: bool) -> list[str]:
    """One generate() call for rows sharing a prefix length; returns the text after the prefix."""
    prefix_length = len(prefixes[0])
    search = search_arguments(decoding, tokenizer, prefix_length, candidate_sets)
    output = model.generate(**inputs, decoder_input_ids=torch.tensor(prefixes, device=inputs["input_ids"].device),
                            synced_gpus=synced_gpus, use_cache=True, **search)
    generated = output[:, prefix_length:].tolist()
    if candidate_sets is None:
        return [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return [_constrained_answer(tokens, c, tokenizer) for tokens, c in zip(generated, candidate_sets, strict=True)]


def search_arguments(decoding: Decoding, tokenizer, prefix_length: int,
                     candidate_sets: Sequence[CandidateSet] | None) -> dict:
    """generate() arguments: OFA's search for free decoding; the candidate trie (which ends every answer with EOS)
    for constrained decoding. Both allow max_new_tokens answer tokens plus EOS, as fairseq's max_len_b does."""
    if candidate_sets is None:
        search = ofa_beam_search_kwargs(decoding.beam, decoding.max_new_tokens, lenpen=decoding.length_penalty,
                                        no_repeat_ngram_size=decoding.no_repeat_ngram_size,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        # its EOS-at-the-limit rule counts from a one-token decoder start; here the prompt may precede the answer
        limit = EOSAtMaxLength(prefix_length + decoding.max_new_tokens + 1, tokenizer.eos_token_id)
        return {**search, "logits_processor": LogitsProcessorList([limit])}
    tries = [c.trie for c in candidate_sets]
    constraint = TrieConstraint(tries, decoding.beam, prefix_length, tokenizer.pad_token_id)
    return {"do_sample": False, "num_beams": decoding.beam, **beam_ranking(decoding.beam, decoding.length_penalty),
            "max_new_tokens": decoding.max_new_tokens + 1, "logits_processor": LogitsProcessorList([constraint])}


def _constrained_answer(tokens: list[int], candidates: CandidateSet, tokenizer) -> str:
    """The candidate a constrained sequence spells; a sequence cut by max_new_tokens before EOS stays partial."""
    eos = tokenizer.eos_token_id
    tokens = tokens[:tokens.index(eos) + 1] if eos in tokens else [t for t in tokens if t != tokenizer.pad_token_id]
    answer = candidates.answer_for(tokens)
    return answer if answer is not None else tokenizer.decode(tokens, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------------------------------
# All-candidate scoring


def _select_samples(encoder_output, index: torch.Tensor, batch_size: int):
    """Pick rows of every per-sample tensor of the encoder output (batch-1 tensors are shared and kept)."""
    selected = {}
    for key, value in encoder_output.items():
        if isinstance(value, torch.Tensor) and value.shape[0] == batch_size:
            value = value.index_select(0, index)
        selected[key] = value
    return type(encoder_output)(**selected)


def _pad(rows: Sequence[Sequence[int]], value: int, device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _trie_mask(sequences: Sequence[Sequence[int]], offsets: Sequence[int], tries: Sequence[CandidateTrie],
               shape: tuple[int, int, int], device) -> torch.Tensor:
    """(N, T, V) bool: the tokens the trie allows at each teacher-forced candidate step (all tokens elsewhere)."""
    mask = torch.ones(shape, dtype=torch.bool)
    for n, (sequence, offset, trie) in enumerate(zip(sequences, offsets, tries, strict=True)):
        for t in range(len(sequence)):
            mask[n, offset + t] = False
            mask[n, offset + t, trie.allowed(sequence[:t])] = True
    return mask.to(device)


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """(N, T, V) logits and (N, T) labels (-100 = none) -> (N,) summed log-probabilities of the labels."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    log_probs = F.log_softmax(logits, dim=-1)
    keep = labels.ne(-100)
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T)
    return picked.masked_fill(~keep, 0.0).sum(-1)


def score_batch(model, tokenizer, batch: dict, decoding: Decoding, candidate_sets: Sequence[CandidateSet],
                sync_count: Callable[[int], int] | None = None) -> tuple[list[str], list[list[float]]]:
    """Teacher-forced log-probability of every candidate of every sample; returns the argmax answers and all scores.

    The decoder reads `prefix + candidate` (prefix = `<s>`, or `<s> prompt` under prev_output) and only the
    candidate's tokens and EOS are scored. `sync_count(n) -> max n over ranks` keeps ranks in lockstep under ZeRO-3
    (every forward is a collective there): a rank with fewer chunks runs its last chunk again for nothing.
    """
    batch_size = batch["input_ids"].shape[0]
    device = batch["input_ids"].device
    prefixes = decoder_prefixes(batch, model.config.decoder_start_token_id)
    encoder_output = model.get_encoder()(**encoder_inputs(batch))
    pairs = [(s, c) for s, cands in enumerate(candidate_sets) for c in range(len(cands.token_ids))]
    # similar lengths share a chunk: one long answer would otherwise pad the whole chunk to its length
    pairs.sort(key=lambda pair: len(prefixes[pair[0]]) + len(candidate_sets[pair[0]].token_ids[pair[1]]))
    chunks = [pairs[i:i + decoding.score_chunk] for i in range(0, len(pairs), decoding.score_chunk)]
    total = sync_count(len(chunks)) if sync_count else len(chunks)
    scores: list[list[float]] = [[0.0] * len(c.token_ids) for c in candidate_sets]
    for i in range(total):
        chunk = chunks[min(i, len(chunks) - 1)]
        sequences = [candidate_sets[s].token_ids[c] for s, c in chunk]
        offsets = [len(prefixes[s]) - 1 for s, _ in chunk]  # label position of the candidate's first token
        index = torch.tensor([s for s, _ in chunk], device=device)
        decoder_input_ids = _pad([prefixes[s] + seq[:-1] for (s, _), seq in zip(chunk, sequences, strict=True)],
                                 tokenizer.pad_token_id, device)
        labels = _pad([[-100] * offset + seq for offset, seq in zip(offsets, sequences, strict=True)], -100, device)
        logits = model(encoder_outputs=_select_samples(encoder_output, index, batch_size),
                       decoder_input_ids=decoder_input_ids, use_cache=False).logits
        if i >= len(chunks):
            continue  # a padding pass that only kept this rank in step with the others
        allowed = None
        if decoding.score_normalize == "trie":
            tries = [candidate_sets[s].trie for s, _ in chunk]
            allowed = _trie_mask(sequences, offsets, tries, tuple(logits.shape), device)
        for (s, c), value in zip(chunk, sequence_log_probs(logits, labels, allowed).tolist(), strict=True):
            scores[s][c] = value
    answers = [cands.answers[max(range(len(row)), key=row.__getitem__)] for cands, row in zip(candidate_sets, scores,
                                                                                             strict=True)]
    return answers, scores


# ---------------------------------------------------------------------------------------------------------------------
# One batch, any mode


def predict_batch(model, tokenizer, batch: dict, records: Sequence[Record], task: Task, decoding: Decoding,
                  candidates: CandidateCache | None = None, synced_gpus: bool = False,
                  sync_count: Callable[[int], int] | None = None) -> list[str]:
    """Predictions for one collated batch of `records` of one task, in the configured mode."""
    if decoding.mode == "generate":
        return generate_batch(model, tokenizer, batch, decoding, None, synced_gpus, sync_count)
    candidates = candidates or CandidateCache(task, tokenizer)
    candidate_sets = [candidates(r) for r in records]
    if decoding.mode == "constrained":
        return generate_batch(model, tokenizer, batch, decoding, candidate_sets, synced_gpus, sync_count)
    answers, _ = score_batch(model, tokenizer, batch, decoding, candidate_sets, sync_count)
    return answers
