"""PubMedQA PQA-L: `ori_pqal.json` (PMID → QUESTION, CONTEXTS, final_decision, ...) + `test_ground_truth.json`.

Test = the 500 PMIDs of test_ground_truth.json (their labels are used); train = the other 500.
"""

from __future__ import annotations

from pathlib import Path

from scaling.data.records import BadRecord, DataError, Record, RecordCollector, check_path, require_text
from scaling.data.sources.common import as_row, read_json
from scaling.data.tasks import YES_NO_MAYBE

NAME = "pubmedqa"
TASK = "qa"
SPLITS = ("train", "test")


def load(path: Path, split: str, out: RecordCollector) -> None:
    """Reads one split from the folder holding ori_pqal.json and test_ground_truth.json."""
    file = check_path(path / "ori_pqal.json", "PubMedQA ori_pqal.json")
    items, test_labels = read_json(file), read_json(check_path(path / "test_ground_truth.json", "test labels"))
    if not isinstance(items, dict) or not isinstance(test_labels, dict):
        raise DataError(f"{path}: ori_pqal.json and test_ground_truth.json must map PMID → record / label")
    for index, (pmid, item) in enumerate(items.items()):
        if (pmid in test_labels) != (split == "test"):
            continue
        with out.reading(file, index):
            out.add(make_record(pmid, as_row(item), test_labels.get(pmid), index, file))


def make_record(pmid: str, item: dict, test_label: str | None, index: int, file: Path) -> Record:
    contexts = item.get("CONTEXTS")
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise BadRecord("wrong value type", "CONTEXTS", "CONTEXTS must be a list of strings")
    label = test_label or require_text(item, "final_decision", "give the yes/no/maybe decision")
    if label not in YES_NO_MAYBE:
        raise BadRecord("unknown label", "final_decision", "use yes, no or maybe", detail=f"got {label!r}")
    return Record(
        id=pmid,
        task=TASK,
        image=None,
        text={"question": require_text(item, "QUESTION", "write the question"), "context": " ".join(contexts)},
        target=label,
        candidates=list(YES_NO_MAYBE),
        attributes={"year": item.get("YEAR"), "long_answer": item.get("LONG_ANSWER"),
                    "sections": item.get("LABELS")},
        source=str(file),
        index=index,
    )
