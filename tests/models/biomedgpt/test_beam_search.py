"""Beam search of `generate()` against OFA's fairseq SequenceGenerator, on a seeded `test`-preset model.

`fairseq_beam_search` below re-implements, for one sample, the algorithm of OFA models/sequence_generator.py
`_generate` with fairseq's `search.BeamSearch.step` and `NGramRepeatBlock`: per step, log-softmax of the last
decoder position; EOS banned while step < min_len; <pad> banned; only EOS allowed at step == max_len; n-gram
blocking; the best 2 x beam of (cumulative score + log-probability) over beams x vocabulary (only the first beam at
step 0); EOS among the best `beam` finishes a hypothesis with score / (step + 1) ** lenpen (tokens before it + EOS)
until `beam` are finished; the best `beam` non-EOS candidates continue; finished hypotheses sorted by score.

`generate(**ofa_beam_search_kwargs(...))` must return the same hypotheses with the same scores. The plain
`generate(num_beams, length_penalty, no_repeat_ngram_size, min_new_tokens, max_new_tokens)` differs from fairseq in
the rules listed in scaling/models/biomedgpt/generation.py, which each of those kwargs undoes:
  1. early_stopping: transformers keeps searching after `beam` hypotheses finished while a running one might still
     beat them; fairseq stops.                                                            -> early_stopping=True
  2. fairseq never selects <pad>.                                                       -> suppress_tokens=[pad]
  3. max length: fairseq's max_len excludes EOS and forces EOS at step max_len, scoring it; transformers'
     max_new_tokens includes EOS and finishes beams at the limit on their last token, without EOS (checked below).
                                                              -> max_new_tokens=max_len + 1, EOSAtMaxLength
  4. fairseq's default min_len is 1 (no empty hypothesis); transformers' is 0.          -> min_new_tokens=min_len
  5. OFA's --unnormalized (VQA) divides scores by nothing.                               -> length_penalty=0.0
One difference stays: once `beam` hypotheses are finished, fairseq drops any that finish later in the same step,
while transformers swaps one in when it outscores a finished hypothesis (length normalisation makes that possible).
The reference reports when that happens (`displaced`); there, generate() must equal the reference with
transformers' rule (`keep_best_finished=True`), elsewhere fairseq's own result.
"""

import math

import pytest
import torch

from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.models.biomedgpt.generation import ofa_beam_search_kwargs

BOS, PAD, EOS = 0, 1, 2


# --- the reference: fairseq's beam search for one sample ---------------------------------------------------------


def ban_repeated_ngrams(tokens: torch.Tensor, lprobs: torch.Tensor, step: int, n: int) -> None:
    """NGramRepeatBlock: ban every token that would repeat an n-gram of tokens[:, : step + 1] (BOS included)."""
    if n <= 0 or step + 2 - n < 0:
        return
    for row in range(tokens.shape[0]):
        seen = tokens[row, : step + 1].tolist()
        prefix = seen[step + 2 - n :]
        banned = [seen[i + n - 1] for i in range(len(seen) - n + 1) if seen[i : i + n - 1] == prefix]
        lprobs[row, banned] = -math.inf


def beam_step(step: int, lprobs: torch.Tensor, cumulative: torch.Tensor, beam: int):
    """search.BeamSearch.step: the best 2 x beam continuations as (scores, tokens, source beams)."""
    vocab = lprobs.shape[1]
    if step == 0:
        lprobs = lprobs[:1]  # all beams are the same hypothesis
    else:
        lprobs = lprobs + cumulative[:, None]
    scores, flat = torch.topk(lprobs.reshape(-1), k=min(2 * beam, lprobs.numel() - 1))  # (beams * vocab,)
    return scores, flat % vocab, flat.div(vocab, rounding_mode="floor")


def fairseq_beam_search(
    next_lprobs, beam: int, max_len: int, min_len: int, lenpen: float, ngram: int, keep_best_finished: bool = False
) -> dict:
    """Finished hypotheses (generated tokens ending in EOS, normalised score), best first.

    `displaced` tells whether a hypothesis finishing after the `beam` finished slots were full outscored one of them:
    fairseq drops it, transformers swaps it in; `keep_best_finished=True` applies transformers' rule instead.
    """
    tokens = torch.full((beam, max_len + 2), PAD)
    tokens[:, 0] = BOS
    scores = torch.zeros(beam, max_len + 1)  # cumulative log-probability after each step
    finished, displaced = [], False
    for step in range(max_len + 1):
        lprobs = next_lprobs(tokens[:, : step + 1]).clone()  # (beam, vocab)
        if step < min_len:
            lprobs[:, EOS] = -math.inf
        lprobs[:, PAD] = -math.inf
        if step >= max_len:
            eos = lprobs[:, EOS].clone()
            lprobs[:] = -math.inf
            lprobs[:, EOS] = eos
        ban_repeated_ngrams(tokens, lprobs, step, ngram)
        cand_scores, cand_tokens, cand_beams = beam_step(step, lprobs, scores[:, step - 1] if step else None, beam)
        is_eos = cand_tokens.eq(EOS) & cand_scores.ne(-math.inf)
        for rank in is_eos[:beam].nonzero().squeeze(1).tolist():  # EOS among the best `beam` finishes a hypothesis
            hypothesis = torch.cat([tokens[cand_beams[rank], 1 : step + 1], torch.tensor([EOS])])
            candidate = (hypothesis.tolist(), cand_scores[rank].item() / (step + 1) ** lenpen)
            if len(finished) < beam:
                finished.append(candidate)
                continue
            worst = min(range(beam), key=lambda i: finished[i][1])
            if candidate[1] > finished[worst][1]:
                displaced = True
                if keep_best_finished:
                    finished[worst] = candidate
        if len(finished) == beam or step == max_len:
            break
        active = (~is_eos).nonzero().squeeze(1)[:beam]  # the best `beam` candidates that are not EOS
        tokens = tokens[cand_beams[active]].clone()
        tokens[:, step + 1] = cand_tokens[active]
        scores = scores[cand_beams[active]].clone()
        scores[:, step] = cand_scores[active]
    finished.sort(key=lambda hypothesis: hypothesis[1], reverse=True)
    return {"hypotheses": finished, "displaced": displaced}


# --- the model and its inputs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    """Seeded `test`-preset weights; a larger EOS row (tied output projection) makes beams end at varied lengths."""
    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_preset("test", dropout=0.0)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = "norm" in name or "_ln" in name or ".bn" in name
            if name.endswith("c_attn") or (is_norm and name.endswith("weight")):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.2 * torch.randn_like(param))
        model.get_input_embeddings().weight[EOS] *= EOS_SCALE
    return model


EOS_SCALE = 7.0


@pytest.fixture(scope="module")
def batch():
    """Two samples: one with an image, one without (patch_masks False), padded text."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.tensor([[BOS, 11, 12, 13, 14, EOS], [BOS, 21, 22, EOS, PAD, PAD]])
    return {
        "input_ids": input_ids,
        "attention_mask": input_ids.ne(PAD).long(),
        "pixel_values": torch.randn(2, 3, 32, 32, generator=generator),
        "patch_masks": torch.tensor([True, False]),
    }


def sample_lprobs(model, batch: dict, index: int):
    """Log-probabilities of the next token for decoder prefixes (beam, t) of sample `index`, recomputed without cache."""
    length = int(batch["attention_mask"][index].sum())
    inputs = {"input_ids": batch["input_ids"][index : index + 1, :length]}
    if batch["patch_masks"][index]:
        inputs["pixel_values"] = batch["pixel_values"][index : index + 1]

    @torch.no_grad()
    def next_lprobs(prefixes: torch.Tensor) -> torch.Tensor:
        expanded = {key: value.expand(prefixes.shape[0], *value.shape[1:]) for key, value in inputs.items()}
        logits = model(**expanded, decoder_input_ids=prefixes, use_cache=False).logits[:, -1]
        return logits.float().log_softmax(-1)

    return next_lprobs


def generated_hypotheses(sequences: torch.Tensor, scores: torch.Tensor, beam: int) -> list[list]:
    """generate() output (B * beam, T) -> per sample [(tokens after the start token up to EOS, score)]."""
    per_sample = []
    for sample in range(sequences.shape[0] // beam):
        rows = []
        for row in range(sample * beam, (sample + 1) * beam):
            tokens = sequences[row, 1:].tolist()
            rows.append((tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens, scores[row].item()))
        per_sample.append(rows)
    return per_sample


# --- tests -------------------------------------------------------------------------------------------------------

# (beam, max_len, min_len, lenpen, no_repeat_ngram_size, unnormalized): OFA's caption/summary evaluation settings
# (beam 5, no-repeat 3, lenpen 1 or 0.7), its VQA one (--unnormalized), and a min_len above 1
SETTINGS = [
    (5, 8, 1, 1.0, 3, False),
    (5, 7, 3, 0.7, 3, False),
    (4, 6, 1, 1.0, 0, True),
    (5, 9, 0, 2.0, 2, False),
]


def reference_search(model, batch, sample: int, setting: tuple, keep_best_finished: bool = False) -> dict:
    """fairseq_beam_search of one sample under one SETTINGS entry."""
    beam, max_len, min_len, lenpen, ngram, unnormalized = setting
    lprobs = sample_lprobs(model, batch, sample)
    lenpen = 0.0 if unnormalized else lenpen
    return fairseq_beam_search(lprobs, beam, max_len, min_len, lenpen, ngram, keep_best_finished)


@pytest.mark.parametrize("setting", SETTINGS, ids=[str(setting) for setting in SETTINGS])
def test_generate_matches_fairseq_beam_search(model, batch, setting):
    beam = setting[0]
    out = model.generate(
        **batch,
        **ofa_beam_search_kwargs(*setting),
        num_return_sequences=beam,
        return_dict_in_generate=True,
        output_scores=True,
    )
    ours = generated_hypotheses(out.sequences, out.sequences_scores, beam)
    for sample in range(2):
        reference = reference_search(model, batch, sample, setting)
        if reference["displaced"]:  # the one remaining difference: transformers swaps in the better late finisher
            reference = reference_search(model, batch, sample, setting, keep_best_finished=True)
        expected = reference["hypotheses"]
        assert [tokens for tokens, _ in ours[sample]] == [tokens for tokens, _ in expected], sample
        ours_scores, expected_scores = ([score for _, score in hypotheses] for hypotheses in (ours[sample], expected))
        assert torch.allclose(torch.tensor(ours_scores), torch.tensor(expected_scores), atol=1e-5), sample


def test_settings_cover_early_eos_the_max_len_limit_and_the_remaining_difference(model, batch):
    """The comparison is only meaningful if hypotheses end both by choosing EOS and at max_len, and if fairseq's
    finished-slot rule is exercised in both of its outcomes."""
    endings, displaced = set(), []
    for setting in SETTINGS:
        for sample in range(2):
            reference = reference_search(model, batch, sample, setting)
            max_len = setting[1]
            endings |= {"limit" if len(tokens) == max_len + 1 else "early" for tokens, _ in reference["hypotheses"]}
            displaced.append(reference["displaced"])
    assert endings == {"early", "limit"}
    assert any(displaced) and not all(displaced)


def test_plain_max_new_tokens_ends_beams_without_eos_at_the_limit(model, batch):
    """Difference 3: with max_new_tokens=max_len alone, beams cut at the limit carry no EOS; fairseq's all end in EOS."""
    beam, max_len = 5, 4
    out = model.generate(
        **batch,
        num_beams=beam,
        max_new_tokens=max_len,
        num_return_sequences=beam,
        return_dict_in_generate=True,
        output_scores=True,
    )
    ours = generated_hypotheses(out.sequences, out.sequences_scores, beam)
    cut = [tokens for sample in ours for tokens, _ in sample if tokens[-1] != EOS]
    assert cut and all(len(tokens) == max_len for tokens in cut)
    reference = fairseq_beam_search(sample_lprobs(model, batch, 0), beam, max_len, 1, 1.0, 0)
    assert all(tokens[-1] == EOS for tokens, _ in reference["hypotheses"])
