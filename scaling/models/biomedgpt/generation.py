"""`generate()` arguments that reproduce OFA's beam search (fairseq `SequenceGenerator`, OFA models/sequence_generator.py).

Both searches keep the 2 x beam best continuations per step, finish a hypothesis when EOS is among the best `beam`
of them, continue with the best `beam` that are not EOS, and score a finished hypothesis by its summed
log-probabilities divided by len ** lenpen, len counting the generated tokens including EOS. transformers differs in
five rules, each mapped to an argument by `ofa_beam_search_kwargs`:

1. Stopping. fairseq stops a sample once `beam` hypotheses are finished; transformers' default keeps searching while
   a running beam could still beat the worst finished one. -> early_stopping=True.
2. Padding. fairseq never selects <pad>. -> suppress_tokens=[pad].
3. Length. fairseq's max_len (max_len_a * source length + max_len_b; the source length is the padded width of the
   text tokens) counts the tokens before EOS, and at step max_len allows only EOS, scoring its log-probability.
   transformers' max_new_tokens counts EOS too and, at the limit, finishes the best beams on whatever token they
   chose, without an EOS. -> max_new_tokens = max_len + 1 and `EOSAtMaxLength`.
4. Minimum length. fairseq's min_len (default 1) bans EOS during the first min_len steps, so no hypothesis is empty;
   transformers bans nothing by default. -> min_new_tokens = min_len.
5. --unnormalized (OFA's VQA evaluation) divides by nothing. -> length_penalty = 0, as len ** 0 = 1.

One difference remains: when, in one step, more hypotheses finish than finished slots are left, fairseq keeps the
earlier-ranked ones, transformers the best-scoring among all finished so far. The two agree unless a hypothesis
finishing in that step scores higher than one finished earlier.
Not covered: temperature != 1, prefix tokens (the prompt in the decoder), the constraint trie and ensembles.
"""

import math

import torch
from transformers import LogitsProcessor, LogitsProcessorList


class EOSAtMaxLength(LogitsProcessor):
    """At the last step `max_length` allows, keep only EOS with its own log-probability (fairseq's max_len rule).

    transformers' ForcedEOSTokenLogitsProcessor sets EOS to 0 instead, which drops EOS's log-probability from the
    hypothesis score that fairseq counts.
    """

    def __init__(self, max_length: int, eos_token_id: int):
        self.max_length = max_length
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """(beams, vocab) log-probabilities -> the same, all but EOS at -inf on the last step."""
        if input_ids.shape[-1] < self.max_length - 1:
            return scores
        only_eos = torch.full_like(scores, -math.inf)
        only_eos[:, self.eos_token_id] = scores[:, self.eos_token_id]
        return only_eos


def beam_ranking(beam: int, lenpen: float) -> dict:
    """fairseq's stopping rule and length penalty, for beam search only: greedy search ranks nothing, and transformers
    warns about each flag a greedy call is given."""
    return {"early_stopping": True, "length_penalty": lenpen} if beam > 1 else {}


def ofa_beam_search_kwargs(
    beam: int,
    max_len: int,
    min_len: int = 1,
    lenpen: float = 1.0,
    no_repeat_ngram_size: int = 0,
    unnormalized: bool = False,
    pad_token_id: int = 1,
    eos_token_id: int = 2,
) -> dict:
    """generate() arguments equal to OFA's SequenceGenerator(beam, max_len_b=max_len, min_len, lenpen, ...).

    `max_len` is fairseq's max_len_a * source length + max_len_b; the decoder starts from its start token alone.
    """
    if not 0 <= min_len <= max_len:
        raise ValueError(f"min_len {min_len} must lie in [0, max_len {max_len}] (fairseq asserts the same)")
    decoder_start_length = 1
    return dict(
        do_sample=False,
        num_beams=beam,
        **beam_ranking(beam, 0.0 if unnormalized else lenpen),
        no_repeat_ngram_size=no_repeat_ngram_size,
        min_new_tokens=min_len,
        max_new_tokens=max_len + 1,
        suppress_tokens=[pad_token_id],
        logits_processor=LogitsProcessorList([EOSAtMaxLength(decoder_start_length + max_len + 1, eos_token_id)]),
    )
