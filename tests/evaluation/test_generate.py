"""Constrained decoding only produces candidates; all-candidate scoring equals an independent forward-pass argmax."""

import pytest
import torch

from scaling.config import Decoding
from scaling.data.records import Record
from scaling.data.tasks import get_task
from scaling.evaluation.generate import CandidateCache, CandidateTrie, generate_batch, score_batch
from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.models.biomedgpt.tokenization import train_bpe_tokenizer

CORPUS = ["is there a lesion in the left lung?", "yes", "no", "left lower lobe", "right upper lobe", "ct scan",
          "mri of the brain", "what organ is shown?", "the liver", "chest x ray", "pleural effusion"] * 20
ANSWER_LISTS = [["yes", "no"], ["left lower lobe", "left upper lobe", "right upper lobe", "liver"],
                ["ct", "ct scan", "mri", "x ray", "chest x ray"]]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=300, num_codes=0, num_bins=0)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = BiomedGPTConfig.from_preset("test", vocab_size=len(tokenizer))
    return BiomedGPTForConditionalGeneration(config).eval()


def _records(n):
    questions = ["is there a lesion?", "where is the mass located in the chest?", "what modality is this?"]
    return [Record(id=str(i), task="vqa", image=None, text={"question": questions[i % 3] + " " * (i % 5)},
                   target=ANSWER_LISTS[i % 3][0], candidates=ANSWER_LISTS[i % 3]) for i in range(n)]


def _batch(tokenizer, model, records, seed=0):
    task = get_task("vqa")
    encoded = tokenizer([task.prompt(r) + " scan" * (i % 4) for i, r in enumerate(records)], padding=True,
                        return_tensors="pt")
    size = model.config.image_size
    pixels = torch.randn(len(records), 3, size, size, generator=torch.Generator().manual_seed(seed))
    patch_masks = torch.tensor([i % 4 != 3 for i in range(len(records))])  # some samples without an image
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "pixel_values": pixels,
            "patch_masks": patch_masks}


def test_trie_allows_only_candidate_continuations():
    trie = CandidateTrie([[5, 6, 2], [5, 7, 2], [8, 2]])
    assert sorted(trie.allowed([])) == [5, 8]
    assert sorted(trie.allowed([5])) == [6, 7]
    assert trie.allowed([5, 6]) == [2]
    assert trie.allowed([5, 6, 2]) == [] and trie.allowed([9]) == []


@pytest.mark.parametrize("beam", [1, 3])
def test_constrained_generation_only_returns_candidates(tokenizer, model, beam):
    records = _records(24)
    cache = CandidateCache(get_task("vqa"), tokenizer)
    decoding = Decoding(mode="constrained", beam=beam, max_new_tokens=12)
    with torch.no_grad():
        for seed in range(2):
            batch = _batch(tokenizer, model, records, seed)
            answers = generate_batch(model, tokenizer, batch, decoding, [cache(r) for r in records])
            for answer, record in zip(answers, records, strict=True):
                assert answer in record.candidates, (answer, record.candidates)


def test_free_generation_is_not_limited_to_candidates(tokenizer, model):
    """The random model says other things when nothing constrains it (so the test above can fail)."""
    records = _records(12)
    with torch.no_grad():
        answers = generate_batch(model, tokenizer, _batch(tokenizer, model, records), Decoding(max_new_tokens=6), None)
    assert any(a not in r.candidates for a, r in zip(answers, records, strict=True))


def _independent_scores(model, tokenizer, batch, sample, sequences, normalize, prefix=(0,)):
    """Summed log-probabilities from a full forward pass (encoder included) per candidate, trie sets by brute force."""
    scores = []
    for sequence in sequences:
        inputs = {k: batch[k][sample:sample + 1] for k in ("input_ids", "attention_mask", "pixel_values", "patch_masks")}
        decoder_input_ids = torch.tensor([list(prefix) + sequence[:-1]])
        logits = model(**inputs, decoder_input_ids=decoder_input_ids).logits[0].float()  # (T, V)
        total = 0.0
        for t, token in enumerate(sequence):
            step = logits[len(prefix) - 1 + t]
            if normalize == "trie":
                allowed = {s[t] for s in sequences if len(s) > t and s[:t] == sequence[:t]}
                keep = torch.zeros_like(step, dtype=torch.bool)
                keep[list(allowed)] = True
                step = step.masked_fill(~keep, float("-inf"))
            total += torch.log_softmax(step, -1)[token].item()
        scores.append(total)
    return scores


@pytest.mark.parametrize("normalize", ["vocab", "trie"])
def test_all_candidate_scoring_equals_forward_pass_argmax(tokenizer, model, normalize):
    records = _records(6)
    cache = CandidateCache(get_task("vqa"), tokenizer)
    candidate_sets = [cache(r) for r in records]
    batch = _batch(tokenizer, model, records)
    decoding = Decoding(mode="score", score_chunk=4, score_normalize=normalize)  # chunks cross sample boundaries
    with torch.no_grad():
        answers, scores = score_batch(model, tokenizer, batch, decoding, candidate_sets)
        for sample, candidates in enumerate(candidate_sets):
            expected = _independent_scores(model, tokenizer, batch, sample, candidates.token_ids, normalize)
            assert scores[sample] == pytest.approx(expected, abs=1e-4)
            assert answers[sample] == candidates.answers[max(range(len(expected)), key=expected.__getitem__)]


def test_records_without_candidates_are_refused_by_name(tokenizer):
    record = Record(id="q7", task="vqa", image=None, text={"question": "why?"}, target="because", index=7)
    with pytest.raises(ValueError, match="q7.*no candidate answers"):
        CandidateCache(get_task("vqa"), tokenizer)(record)


def _prev_output_batch(tokenizer, model, records):
    from scaling.data.collate import Collator

    return Collator(tokenizer, model.config.image_size, 64, 16, prompt_type="prev_output")(records)


def test_prev_output_scoring_reads_the_prompt_in_the_decoder(tokenizer, model):
    """BiomedGPT's VQA layout: the decoder is prefixed with `<s> prompt`; only the candidate is scored."""
    records = _records(4)
    batch = _prev_output_batch(tokenizer, model, records)
    cache = CandidateCache(get_task("vqa"), tokenizer)
    candidate_sets = [cache(r) for r in records]
    decoding = Decoding(mode="score", score_chunk=5, score_normalize="vocab")
    with torch.no_grad():
        _, scores = score_batch(model, tokenizer, batch, decoding, candidate_sets)
        for sample, candidates in enumerate(candidate_sets):
            prompt = tokenizer(get_task("vqa").prompt(records[sample]), add_special_tokens=False)["input_ids"]
            expected = _independent_scores(model, tokenizer, batch, sample, candidates.token_ids, "vocab",
                                           prefix=[0, *prompt])
            assert scores[sample] == pytest.approx(expected, abs=1e-4)


def test_prev_output_constrained_generation_with_mixed_prompt_lengths(tokenizer, model):
    records = _records(9)  # three questions of different token lengths, padded differently
    batch = _prev_output_batch(tokenizer, model, records)
    cache = CandidateCache(get_task("vqa"), tokenizer)
    decoding = Decoding(mode="constrained", max_new_tokens=12)
    with torch.no_grad():
        answers = generate_batch(model, tokenizer, batch, decoding, [cache(r) for r in records])
        # each sample alone gives the same answer as inside the mixed batch
        alone = [generate_batch(model, tokenizer, _prev_output_batch(tokenizer, model, [r]), decoding, [cache(r)])[0]
                 for r in records[:3]]
    assert all(a in r.candidates for a, r in zip(answers, records, strict=True))
    assert answers[:3] == alone


@pytest.mark.parametrize("beam", [1, 3])
def test_free_generation_stops_like_fairseq_after_the_prompt(tokenizer, model, beam):
    """OFA's search with the prompt in the decoder: at least one answer token (min_len 1), at most max_new_tokens of
    them, then EOS (scored, as fairseq's max_len_b rule), counted from the end of each sample's prompt."""
    from scaling.evaluation.generate import decoder_prefixes, encoder_inputs, search_arguments

    records = _records(6)
    batch = _prev_output_batch(tokenizer, model, records)
    prefixes = decoder_prefixes(batch, model.config.decoder_start_token_id)
    limit = 3
    lengths = []
    with torch.no_grad():
        for row, prefix in enumerate(prefixes):  # prompts of different lengths
            search = search_arguments(Decoding(beam=beam, max_new_tokens=limit), tokenizer, len(prefix), None)
            output = model.generate(**encoder_inputs(batch, [row]), decoder_input_ids=torch.tensor([prefix]), **search)
            answer = output[0, len(prefix):].tolist()
            assert answer[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in answer[:-1]
            lengths.append(len(answer) - 1)
    assert all(1 <= n <= limit for n in lengths) and limit in lengths  # the random model runs into the limit
    assert len({len(p) for p in prefixes}) > 1


@pytest.mark.parametrize("mode", ["generate", "constrained"])
@pytest.mark.parametrize("beam", [1, 5])
def test_search_flags_are_valid_for_the_search_they_configure(tokenizer, mode, beam):
    """Greedy search gets no beam-only flag (transformers warns about each one once per process, so the default job's
    greedy VQA evaluation printed a warning); beam search keeps fairseq's stopping rule and length penalty."""
    from transformers import GenerationConfig

    from scaling.evaluation.generate import search_arguments

    sets = [CandidateCache(get_task("vqa"), tokenizer)(r) for r in _records(3)] if mode == "constrained" else None
    search = search_arguments(Decoding(mode=mode, beam=beam, length_penalty=0.5), tokenizer, 4, sets)
    flags = {k: v for k, v in search.items() if k != "logits_processor"}
    GenerationConfig(**flags).validate(strict=True)  # raises on any flag the search ignores
    assert ("early_stopping" in flags) == (beam > 1)
    if beam > 1:
        assert flags["early_stopping"] is True and flags["length_penalty"] == 0.5
    with pytest.raises(ValueError, match="early_stopping"):  # the check catches what greedy search used to get
        GenerationConfig(**{**flags, "num_beams": 1, "early_stopping": True}).validate(strict=True)
