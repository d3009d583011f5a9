"""BiomedGPT/OFA tokenizer: GPT-2 byte-level BPE with fairseq ids, plus image-code and location-bin tokens.

Id layout (59,457 entries, as in OFA/BiomedGPT `tasks/ofa_task.py`):
    0..3            <s> <pad> </s> <unk>
    4..50263        GPT-2 BPE tokens, in the order of the fairseq `dict.txt` (id = 4 + line of the GPT-2 id)
    50264           <mask>
    50265..58456    <code_0> .. <code_8191>   (VQ-GAN image codes)
    58457..59456    <bin_0> .. <bin_999>      (quantised box coordinates)

The fairseq dictionary order is baked into the BPE vocabulary itself, so the fast tokenizer emits fairseq ids
directly and `save_pretrained` writes an ordinary `tokenizer.json`. Text is not given an automatic prefix space:
BiomedGPT prompts and targets carry their own leading space (`" what does the image describe?"`), and
`tokenizer(text)` returns `<s> … </s>`, the encoder input layout.

<mask>, <code_i> and <bin_i> absorb the whitespace before them: OFA never runs them through BPE but joins them to
the BPE ids of the surrounding text with spaces that `Dictionary.encode_line` splits on, so `" region: <bin_3>
<bin_7>"` is the ids of `" region:"` followed by two bin ids, without a space token (the OFA HF port strips that
space as well). The whitespace after them stays, as in OFA's detection targets (`<bin_..> x4` then `" dog"`).
"""

import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
SPECIAL_TOKENS = (BOS, PAD, EOS, UNK)  # ids 0..3, fixed by the fairseq dictionary
NUM_CODES = 8192  # OFA `code_dict_size`
NUM_BINS = 1000  # OFA `num_bins`
MODEL_MAX_LENGTH = 1024  # OFA `max_source_positions`
FAIRSEQ_BPE_FILES = ("encoder.json", "vocab.bpe", "dict.txt")
HF_BPE_FILES = ("vocab.json", "merges.txt")
FAMILY_TOKEN = re.compile(r"<(code|bin)_\d+>")


def code_token(i: int) -> str:
    """Name of the i-th VQ-GAN image-code token."""
    return f"<code_{i}>"


def bin_token(i: int) -> str:
    """Name of the i-th location-bin token."""
    return f"<bin_{i}>"


def fairseq_vocab(encoder_json: Path, dict_txt: Path) -> dict[str, int]:
    """Map byte-level BPE strings to fairseq ids: specials 0..3, then 4 + line of the GPT-2 id in dict.txt, <mask>."""
    gpt2_token = {gpt2_id: token for token, gpt2_id in json.loads(encoder_json.read_text(encoding="utf-8")).items()}
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for line_no, line in enumerate(dict_txt.read_text(encoding="utf-8").splitlines()):
        symbol = line.split(" ", 1)[0]
        if symbol.isdigit() and int(symbol) not in gpt2_token:
            raise ValueError(
                f"{dict_txt} line {line_no + 1}: GPT-2 id {symbol} is not in {encoder_json}; the two files come "
                "from different BPE vocabularies. Use the encoder.json/vocab.bpe/dict.txt of one OFA release."
            )
        # dict.txt lines are GPT-2 ids as strings, except fairseq's padding words `madeupword000x`
        token = gpt2_token[int(symbol)] if symbol.isdigit() else symbol
        vocab[token] = len(SPECIAL_TOKENS) + line_no
    vocab[MASK] = len(vocab)
    return vocab


def read_merges(path: Path) -> list[tuple[str, str]]:
    """Read a GPT-2 merges file (`vocab.bpe` / `merges.txt`), skipping the `#version` header."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


def build_ofa_tokenizer(bpe_dir: str | Path) -> PreTrainedTokenizerFast:
    """Build the 59,457-entry BiomedGPT tokenizer from GPT-2 `encoder.json` + `vocab.bpe` and fairseq `dict.txt`."""
    bpe_dir = Path(bpe_dir)
    _require_files(bpe_dir, FAIRSEQ_BPE_FILES)
    vocab = fairseq_vocab(bpe_dir / "encoder.json", bpe_dir / "dict.txt")
    merges = read_merges(bpe_dir / "vocab.bpe")
    return _byte_level_bpe(vocab, merges, NUM_CODES, NUM_BINS)


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4000,
    num_codes: int = NUM_CODES,
    num_bins: int = NUM_BINS,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE on `texts` with the OFA special-token layout.

    `vocab_size` counts the BPE vocabulary including <s> <pad> </s> <unk> (ids 0..3); <mask>, `num_codes`
    <code_i> and `num_bins` <bin_i> follow it, so the total length is vocab_size + 1 + num_codes + num_bins
    (fewer when the corpus is too small to fill vocab_size).
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(backend.to_str())["model"]
    vocab = dict(trained["vocab"])
    vocab[MASK] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return _byte_level_bpe(vocab, merges, num_codes, num_bins)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a local checkpoint or tokenizer directory (never from a hub).

    Accepted layouts, in order: `tokenizer.json` (written by `save_pretrained`); `vocab.json` + `merges.txt`
    (BART / OFA-HF-port files with fairseq ids; when vocab.json has no <code_i>/<bin_i>, the OFA counts are appended);
    `encoder.json` + `vocab.bpe` + `dict.txt` (the fairseq BPE files, see `build_ofa_tokenizer`).
    """
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    if (directory / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True, **_special_kwargs())
        # files written before these tokens absorbed the space before them encode " <bin_3>" with a space token
        vocab = tokenizer.get_vocab()
        families = sorted((t for t in vocab if FAMILY_TOKEN.fullmatch(t)), key=vocab.__getitem__)
        register_symbol_tokens(tokenizer.backend_tokenizer, families)
    elif all((directory / name).is_file() for name in HF_BPE_FILES):
        vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        # BART/HF-port vocab.json stops at <mask>; ours (save_tokenizer) already lists its code/bin tokens
        has_families = any(FAMILY_TOKEN.fullmatch(token) for token in vocab)
        num_codes, num_bins = (0, 0) if has_families else (NUM_CODES, NUM_BINS)
        tokenizer = _byte_level_bpe(vocab, read_merges(directory / "merges.txt"), num_codes, num_bins)
    elif all((directory / name).is_file() for name in FAIRSEQ_BPE_FILES):
        tokenizer = build_ofa_tokenizer(directory)
    else:
        present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise FileNotFoundError(
            f"No tokenizer files in {directory}: expected tokenizer.json, or {' + '.join(HF_BPE_FILES)}, "
            f"or {' + '.join(FAIRSEQ_BPE_FILES)}; found {present or 'nothing (directory missing or empty)'}. "
            "Point to the checkpoint directory that carries its tokenizer, or build one with `build_ofa_tokenizer`."
        )
    _check_special_ids(tokenizer, directory)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Write `save_pretrained` files plus BART-style `vocab.json`/`merges.txt` (all ids, fairseq order) for OFA tools."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = dict(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _byte_level_bpe(
    vocab: dict[str, int], merges: list[tuple[str, str]], num_codes: int, num_bins: int
) -> PreTrainedTokenizerFast:
    """Wrap a byte-level BPE vocabulary (specials at 0..3) and append `num_codes` <code_i> and `num_bins` <bin_i>."""
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # `<s> A </s>` for one text and `<s> A </s></s> B </s>` for a pair, as BART/OFA
    backend.post_processor = processors.RobertaProcessing(
        (EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=True, add_prefix_space=False
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    listed = sorted((t for t in vocab if FAMILY_TOKEN.fullmatch(t)), key=vocab.__getitem__)
    appended = [code_token(i) for i in range(num_codes)] + [bin_token(i) for i in range(num_bins)]
    # listed codes/bins keep their vocab ids; registering them lets the text "<bin_3>" match before byte-level splitting
    register_symbol_tokens(backend, listed + appended)
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=MODEL_MAX_LENGTH, **_special_kwargs())


def register_symbol_tokens(backend: Tokenizer, family_tokens: list[str]) -> None:
    """Add <mask> (special) and the <code_i>/<bin_i> tokens so that each absorbs the whitespace before it."""
    backend.add_special_tokens([AddedToken(MASK, special=True, lstrip=True, normalized=False)])
    # codes and bins are ordinary (non-special) added tokens, so decoding keeps them, as in the OFA HF port
    backend.add_tokens([AddedToken(t, lstrip=True, normalized=False) for t in family_tokens])


def _special_kwargs() -> dict[str, str]:
    """Special-token roles shared by every BiomedGPT tokenizer."""
    return dict(
        bos_token=BOS, pad_token=PAD, eos_token=EOS, unk_token=UNK, mask_token=MASK, cls_token=BOS, sep_token=EOS
    )


def _check_special_ids(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Fail if the loaded vocabulary does not put <s> <pad> </s> <unk> at ids 0..3 (the model's embedding rows)."""
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise ValueError(
            f"Tokenizer in {directory} is not a BiomedGPT/OFA tokenizer: {dict(zip(SPECIAL_TOKENS, ids, strict=True))}, "
            "expected ids 0..3. Rebuild it with `build_ofa_tokenizer` or `train_bpe_tokenizer`."
        )


def _require_files(directory: Path, names: Iterable[str]) -> None:
    """Raise a FileNotFoundError naming the directory and every missing file."""
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Missing {', '.join(missing)} in {directory}: a BiomedGPT BPE directory holds {', '.join(FAIRSEQ_BPE_FILES)} "
            "(OFA `utils/BPE/`)."
        )
