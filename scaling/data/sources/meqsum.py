"""MeQSum: `MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx`, columns File, CHQ (question), Summary; 1,000 pairs.

The release has no split; rows are taken in file order, the first 80% train, the next 10% validation and the
last 10% test (800/100/100, the sizes of BiomedGPT's MeQSum TSVs).
"""

from __future__ import annotations

from pathlib import Path

from scaling.data.records import DataError, Record, RecordCollector, check_path, require_text

NAME = "meqsum"
TASK = "summarize"
SPLITS = ("train", "validation", "test")
COLUMNS = ("File", "CHQ", "Summary")
FRACTIONS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}


def load(path: Path, split: str, out: RecordCollector) -> None:
    """Reads one split of the workbook at `path` (or the single .xlsx inside the folder `path`)."""
    file = find_workbook(path)
    rows = read_rows(file)
    start, stop = (round(len(rows) * f) for f in FRACTIONS[split])
    for index, row in rows[start:stop]:
        with out.reading(file, index):
            out.add(Record(
                id=require_text(row, "File", "give every row a File id"),
                task=TASK,
                image=None,
                text={"source": require_text(row, "CHQ", "write the consumer health question")},
                target=require_text(row, "Summary", "write the summary"),
                source=str(file),
                index=index,
            ))


def find_workbook(path: Path) -> Path:
    if path.is_file():
        return path
    books = sorted(path.glob("*.xlsx"))
    if len(books) != 1:
        raise DataError(f"{path}: expected one .xlsx, found {len(books)}. Fix: pass the workbook path")
    return books[0]


def read_rows(file: Path) -> list[tuple[int, dict]]:
    """(row number, {column: value}) for the data rows of the first sheet, columns found by header name."""
    import openpyxl  # a core dependency, imported here because only this source needs it

    check_path(file, "MeQSum workbook")
    try:
        sheet = openpyxl.load_workbook(file, read_only=True, data_only=True).worksheets[0]
    except Exception as error:  # openpyxl raises zipfile, KeyError and its own errors for non-xlsx files
        raise DataError(f"{file}: not a readable .xlsx ({error}). Fix: save it as Excel .xlsx") from None
    rows = sheet.iter_rows(values_only=True)
    header = [str(cell).strip() if cell is not None else "" for cell in next(rows, ())]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DataError(f"{file}: missing column(s) {', '.join(missing)} in header {header}. "
                        f"Fix: the first row must name the columns {', '.join(COLUMNS)}")
    columns = {name: header.index(name) for name in COLUMNS}
    data = [(number, {name: row[i] if i < len(row) else None for name, i in columns.items()})
            for number, row in enumerate(rows, start=2)]
    return [(number, row) for number, row in data if any(v is not None for v in row.values())]
