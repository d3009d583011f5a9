from collections import Counter
from pathlib import Path

import pytest

from scaling.data.records import (
    BadRecord,
    ImageRef,
    Record,
    RecordCollector,
    RecordError,
    normalize_answer_type,
    require_text,
)


def record(id_: str, target: str | None = "yes") -> Record:
    return Record(id=id_, task="nli", image=None, text={"sentence1": "a", "sentence2": "b"}, target=target)


def test_image_ref_holds_exactly_one_of_path_or_bytes(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(b"png")
    assert ImageRef(tmp_path / "a.png").read_bytes() == b"png"
    assert ImageRef(path=str(tmp_path / "a.png")).path == tmp_path / "a.png"
    assert ImageRef(data=b"xyz").read_bytes() == b"xyz"
    for bad in ({}, {"path": tmp_path, "data": b"x"}):
        with pytest.raises(ValueError, match="exactly one"):
            ImageRef(**bad)


def test_targets_default_to_the_target():
    assert record("1").targets == ["yes"]
    assert record("1", target=None).targets == []
    several = Record("2", "caption", None, {}, "a cat", targets=["a cat", "one cat"])
    assert several.targets == ["a cat", "one cat"]


def test_collector_skips_and_counts_bad_records():
    out = RecordCollector("skip")
    for index, rec in enumerate([record("1"), record("2"), record("1")]):
        with out.reading("data.jsonl", index):
            out.add(rec)
    with out.reading("data.jsonl", 3):
        raise BadRecord("missing answer", "answer", "add an answer")
    out.skip("no gold label ('-')", 2)
    result = out.result()
    assert [r.id for r in result.records] == ["1", "2"]
    assert result.skipped == Counter({"duplicate id": 1, "missing answer": 1, "no gold label ('-')": 2})
    assert result.n_skipped == 4


def test_collector_error_names_file_index_field_and_fix():
    out = RecordCollector("error")
    with pytest.raises(RecordError) as info, out.reading("train.json", 7):
        raise BadRecord("empty question", "question", "write the question")
    message = str(info.value)
    assert "train.json" in message and "record 7" in message and "'question'" in message
    assert "Fix: write the question" in message and "on_bad_record='skip'" in message


def test_collector_rejects_unknown_policy():
    with pytest.raises(ValueError, match="skip' or 'error"):
        RecordCollector("ignore")


def test_require_text_collapses_whitespace_and_accepts_numbers():
    assert require_text({"q": " is it\tred?\n"}, "q", "") == "is it red?"
    assert require_text({"a": 12}, "a", "") == "12"
    with pytest.raises(BadRecord, match="missing q"):
        require_text({}, "q", "")
    with pytest.raises(BadRecord, match="empty q"):
        require_text({"q": "  "}, "q", "")
    with pytest.raises(BadRecord, match="wrong value type"):
        require_text({"q": ["a list"]}, "q", "")


def test_answer_type_normalised_and_checked():
    assert normalize_answer_type("CLOSED ") == "CLOSED"
    assert normalize_answer_type(" open") == "OPEN"
    with pytest.raises(BadRecord, match="unknown answer type"):
        normalize_answer_type("YES/NO")
