"""Tokenizer parity with the fairseq encoding path, special-token ids, save/load round trips, trained tokenizer."""

import json
from functools import lru_cache
from pathlib import Path

import pytest
import regex

from scaling.models.biomedgpt.tokenization import (
    build_ofa_tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_bpe_tokenizer,
)

BPE_DIR = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "ofa_bpe"
needs_bpe = pytest.mark.skipif(
    not (BPE_DIR / "dict.txt").is_file(),
    reason=f"OFA BPE files (encoder.json, vocab.bpe, dict.txt) absent at {BPE_DIR}",
)

SENTENCES = [
    " what does the image describe?",
    " is there evidence of an aortic aneurysm?",
    ' can text1 " the patient denies chest pain " imply text2 " no angina "?',
    " Ångström, café, naïve — 肺炎 and a 😀 emoji",
    " (a) [b] {c}: 'quoted' \"double\"... !!! ?!",
    " 12.5 mm, 3/4 of 1,000,000 and 2024-01-31",
    "  two   spaces\nnew line\ttab  ",
    " it's they're we'll I'd you've",
    "no leading space",
]


# --- independent reference: GPT-2 byte-level BPE (as fairseq's gpt2_bpe_utils) -> dict.txt line -> 4 + line ---

GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shift)
            shift += 1
    return chars


@lru_cache(maxsize=1)
def reference_tables() -> tuple[dict[str, int], dict[tuple[str, str], int], dict[int, int]]:
    """encoder.json, merge ranks from vocab.bpe, and GPT-2 id -> fairseq id from dict.txt."""
    encoder = json.loads((BPE_DIR / "encoder.json").read_text(encoding="utf-8"))
    merges = (BPE_DIR / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
    ranks = {tuple(m.split()): rank for rank, m in enumerate(merges)}
    dict_lines = (BPE_DIR / "dict.txt").read_text(encoding="utf-8").splitlines()
    fairseq_id = {int(line.split()[0]): 4 + n for n, line in enumerate(dict_lines) if line.split()[0].isdigit()}
    return encoder, ranks, fairseq_id


def reference_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy lowest-rank pair merging on one pre-token."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts[:-1], parts[1:], strict=True))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        first, second = parts[i], parts[i + 1]
        merged, j = [], 0
        while j < len(parts):
            if j < len(parts) - 1 and parts[j] == first and parts[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def reference_bpe_ids(text: str, encoder: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """GPT-2 byte-level BPE of `text` (fairseq gpt2_bpe_utils.Encoder.encode): ids of `encoder`."""
    to_unicode = byte_to_unicode()
    ids = []
    for piece in GPT2_PATTERN.findall(text):
        word = "".join(to_unicode[b] for b in piece.encode("utf-8"))
        ids += [encoder[token] for token in reference_bpe(word, ranks)]
    return ids


def reference_fairseq_ids(text: str) -> list[int]:
    """Encode text the fairseq/OFA way: GPT-2 BPE ids as strings, looked up in dict.txt (offset 4)."""
    encoder, ranks, fairseq_id = reference_tables()
    return [fairseq_id[gpt2_id] for gpt2_id in reference_bpe_ids(text, encoder, ranks)]


# --- OFA's composition of BPE text and symbols (data/ofa_dataset.py encode_text, tasks/ofa_task.py) ---


@lru_cache(maxsize=1)
def ofa_dictionary() -> dict[str, int]:
    """OFA's task dictionary: 4 specials, the dict.txt symbols, <mask>, <code_0..8191>, <bin_0..999>."""
    lines = (BPE_DIR / "dict.txt").read_text(encoding="utf-8").splitlines()
    symbols = ["<s>", "<pad>", "</s>", "<unk>", *(line.split()[0] for line in lines), "<mask>"]
    symbols += [f"<code_{i}>" for i in range(8192)] + [f"<bin_{i}>" for i in range(1000)]
    return {symbol: i for i, symbol in enumerate(symbols)}


def ofa_encode_text(text: str, use_bpe: bool = True) -> list[int]:
    """OFADataset.encode_text: GPT2BPE.encode (ids joined by spaces) unless use_bpe=False, then encode_line."""
    encoder, ranks, _ = reference_tables()
    line = " ".join(map(str, reference_bpe_ids(text, encoder, ranks))) if use_bpe else text
    return [ofa_dictionary()[symbol] for symbol in line.split()]  # Dictionary.encode_line splits on whitespace


def ofa_bpe_line(text: str) -> str:
    """GPT2BPE.encode: the BPE ids of `text` as one space-separated string, to be joined with symbols."""
    encoder, ranks, _ = reference_tables()
    return " ".join(map(str, reference_bpe_ids(text, encoder, ranks)))


# Our text -> how OFA builds the same ids. Grounded captioning and detection follow data/pretrain_data/
# unify_dataset.py; the infilling rows put <mask>/<code_i> where OFA substitutes their ids.
MIXED_SYMBOL_CASES = [
    (" <code_123>", lambda: ofa_encode_text("<code_123>", use_bpe=False)),
    (
        "  what does the region describe? region: <bin_12> <bin_34> <bin_560> <bin_999>",
        lambda: (
            ofa_encode_text("  what does the region describe? region:")
            + ofa_encode_text("<bin_12> <bin_34> <bin_560> <bin_999>", use_bpe=False)
        ),
    ),
    (
        "<bin_1> <bin_2> <bin_3> <bin_4> dog <bin_5> <bin_6> <bin_7> <bin_8> hot dog",
        lambda: ofa_encode_text(
            " ".join(
                [
                    "<bin_1> <bin_2> <bin_3> <bin_4>",
                    ofa_bpe_line(" dog"),
                    "<bin_5> <bin_6> <bin_7> <bin_8>",
                    ofa_bpe_line(" hot dog"),
                ]
            ),
            use_bpe=False,
        ),
    ),
    (
        " the patient <mask> chest pain <mask>.",
        lambda: (
            ofa_encode_text(" the patient")
            + ofa_encode_text("<mask>", use_bpe=False)
            + ofa_encode_text(" chest pain")
            + ofa_encode_text("<mask>", use_bpe=False)
            + ofa_encode_text(".")
        ),
    ),
    (
        " what is the image in the middle part? <code_0> <code_8191>\t<mask>\n<code_7>x",
        lambda: (
            ofa_encode_text(" what is the image in the middle part?")
            + ofa_encode_text("<code_0> <code_8191> <mask> <code_7>", use_bpe=False)
            + ofa_encode_text("x")
        ),
    ),
]


# --- tests ---


@pytest.fixture(scope="module")
def ofa_tokenizer():
    return build_ofa_tokenizer(BPE_DIR)


@needs_bpe
@pytest.mark.parametrize("text", SENTENCES)
def test_ids_match_fairseq_reference(ofa_tokenizer, text):
    expected = reference_fairseq_ids(text)
    assert ofa_tokenizer(text, add_special_tokens=False).input_ids == expected
    assert ofa_tokenizer(text).input_ids == [0, *expected, 2]
    assert ofa_tokenizer.decode(expected) == text


@needs_bpe
def test_known_bart_ids(ofa_tokenizer):
    # fairseq ids of the BiomedGPT caption prompt, as in BART's vocab.json
    assert ofa_tokenizer(" what does the image describe?").input_ids == [0, 99, 473, 5, 2274, 6190, 116, 2]


@needs_bpe
def test_special_token_layout(ofa_tokenizer):
    tok = ofa_tokenizer
    assert len(tok) == 59457
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == 50264
    assert tok.convert_tokens_to_ids(["<code_0>", "<code_8191>", "<bin_0>", "<bin_999>"]) == [
        50265,
        58456,
        58457,
        59456,
    ]
    assert tok(" <bin_3><code_7> <mask>", add_special_tokens=False).input_ids == [58460, 50272, 50264]


@needs_bpe
@pytest.mark.parametrize(("text", "ofa_ids"), MIXED_SYMBOL_CASES, ids=range(len(MIXED_SYMBOL_CASES)))
def test_text_mixed_with_symbols_matches_ofa_composition(ofa_tokenizer, text, ofa_ids):
    """<mask>, <code_i>, <bin_i> take no space token before them; text after them keeps its leading space."""
    assert ofa_tokenizer(text).input_ids == [0, *ofa_ids(), 2]


@needs_bpe
def test_tokenizer_json_from_before_the_symbol_fix_loads_with_it(ofa_tokenizer, tmp_path):
    """A tokenizer.json whose <mask>/<code_i>/<bin_i> keep the space before them is read with OFA's behaviour."""
    save_tokenizer(ofa_tokenizer, tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    for token in saved["added_tokens"]:
        token["lstrip"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved), encoding="utf-8")
    text, ofa_ids = MIXED_SYMBOL_CASES[1]
    assert load_tokenizer(tmp_path)(text).input_ids == [0, *ofa_ids(), 2]


@needs_bpe
def test_save_pretrained_round_trip(ofa_tokenizer, tmp_path):
    save_tokenizer(ofa_tokenizer, tmp_path / "tok")
    reloaded = load_tokenizer(tmp_path / "tok")
    assert len(reloaded) == 59457
    for text in SENTENCES:
        assert reloaded(text).input_ids == ofa_tokenizer(text).input_ids


@needs_bpe
def test_vocab_and_merges_only_directory(ofa_tokenizer, tmp_path):
    """The OFA HF-port layout (vocab.json + merges.txt, no code/bin tokens) loads to the same ids."""
    save_tokenizer(ofa_tokenizer, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 59457
    bart_vocab = {token: i for token, i in vocab.items() if i < 50265}
    (tmp_path / "vocab.json").write_text(json.dumps(bart_vocab), encoding="utf-8")
    reloaded = load_tokenizer(tmp_path)
    assert len(reloaded) == 59457
    assert reloaded.convert_tokens_to_ids(["<code_0>", "<bin_0>"]) == [50265, 58457]
    assert reloaded(SENTENCES[3]).input_ids == ofa_tokenizer(SENTENCES[3]).input_ids


@needs_bpe
def test_load_tokenizer_from_bpe_dir():
    assert load_tokenizer(BPE_DIR)(SENTENCES[0]).input_ids == [0, 99, 473, 5, 2274, 6190, 116, 2]


def test_missing_files_error_names_directory(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"No tokenizer files in .*tokenizer\.json.*vocab\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Missing encoder\.json, vocab\.bpe, dict\.txt in"):
        build_ofa_tokenizer(tmp_path)


def test_dict_from_another_bpe_is_named(tmp_path):
    (tmp_path / "encoder.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b\n")
    (tmp_path / "dict.txt").write_text("1 50\n7 20\n")
    with pytest.raises(ValueError, match=r"dict\.txt line 2: GPT-2 id 7 is not in .*encoder\.json"):
        build_ofa_tokenizer(tmp_path)


def test_trained_tokenizer_has_ofa_families_and_round_trips(tmp_path):
    corpus = [
        " what modality is used? ct",
        " is there a fracture of the left femur? yes",
        " what does the image describe? chest x-ray with bilateral effusions",
    ] * 20
    tok = train_bpe_tokenizer(corpus, vocab_size=400, num_codes=16, num_bins=10)
    base = tok.mask_token_id
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert base == tok.vocab_size - 1 <= 399
    assert tok.convert_tokens_to_ids(["<code_0>", "<code_15>", "<bin_0>", "<bin_9>"]) == [
        base + 1,
        base + 16,
        base + 17,
        base + 26,
    ]
    assert len(tok) == base + 27
    ids = tok(" is there a fracture? <bin_3>").input_ids
    assert ids[0] == 0 and ids[-1] == 2 and ids[-2] == base + 20
    assert tok.decode(ids, skip_special_tokens=True) == " is there a fracture?<bin_3>"  # no space token, as OFA

    save_tokenizer(tok, tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert len(reloaded) == len(tok)
    assert reloaded(" chest x-ray ünïcode").input_ids == tok(" chest x-ray ünïcode").input_ids
    (tmp_path / "tokenizer.json").unlink()  # vocab.json + merges.txt alone keep the custom family sizes
    from_vocab = load_tokenizer(tmp_path)
    assert len(from_vocab) == len(tok)
    assert from_vocab(" a fracture <bin_9><code_15>").input_ids == tok(" a fracture <bin_9><code_15>").input_ids


def test_trained_tokenizer_default_families():
    tok = train_bpe_tokenizer([" a small corpus about lungs"] * 5, vocab_size=300)
    assert len(tok) == tok.vocab_size + 8192 + 1000
    assert tok.convert_tokens_to_ids("<bin_999>") == len(tok) - 1


def test_trained_tokenizer_joins_symbols_to_text_like_ofa(tmp_path):
    """The embedded default tokenizer: ids from its own vocab.json + merges.txt, composed the OFA way."""
    corpus = [" which region does the text describe? region", " the patient has chest pain", " a hot dog"] * 20
    tok = train_bpe_tokenizer(corpus, vocab_size=400, num_codes=16, num_bins=10)
    save_tokenizer(tok, tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
    ranks = {tuple(m.split()): rank for rank, m in enumerate(merges)}

    def bpe(text: str) -> list[int]:
        return reference_bpe_ids(text, vocab, ranks)

    symbols = [vocab[s] for s in ("<bin_3>", "<bin_9>", "<mask>", "<code_15>")]
    text = " which region does the text describe? region: <bin_3> <bin_9> hot dog <mask> chest pain\n<code_15>"
    expected = bpe(" which region does the text describe? region:") + symbols[:2] + bpe(" hot dog")
    expected += [symbols[2]] + bpe(" chest pain") + [symbols[3]]
    assert tok(text).input_ids == [0, *expected, 2]
    assert load_tokenizer(tmp_path)(text).input_ids == [0, *expected, 2]
