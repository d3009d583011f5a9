"""Report files: they exist, their numbers agree with report.json, images are embedded, merging compares runs."""

import json
import re

import pytest
from PIL import Image

from scaling.data.records import CLOSED, OPEN, ImageRef, Record
from scaling.evaluation.metrics import compute_metrics, vqa_hits
from scaling.evaluation.report import (
    fmt,
    merge_reports,
    new_report,
    records_fingerprint,
    sample_rows,
    write_predictions,
    write_report,
)


def _vqa_records(tmp_path):
    image = tmp_path / "scan.png"
    Image.new("L", (40, 30), 120).save(image)
    rows = [("is there a lesion?", "yes", CLOSED, "PRES"), ("is it normal?", "no", CLOSED, "ABN"),
            ("what modality?", "ct", OPEN, "MODALITY"), ("which organ?", "liver", OPEN, "ORGAN")]
    return [Record(id=f"q{i}", task="vqa", image=ImageRef(path=image), text={"question": q}, target=a,
                   answer_type=t, attributes={"category": c}) for i, (q, a, t, c) in enumerate(rows)]


def _evaluation(records, predictions, checkpoint, parameters, tmp_path):
    hits = vqa_hits(predictions, records)
    predictions_file = write_predictions(tmp_path / f"{checkpoint}.jsonl", records, predictions, hits)
    return {"run": 0, "checkpoint": {"name": checkpoint, "path": f"/ckpt/{checkpoint}", "fingerprint": checkpoint * 8,
                                     "parameters": parameters},
            "dataset": {"name": "vqa_rad/test", "source": "vqa_rad", "split": "test", "path": None,
                        "fingerprint": records_fingerprint(records), "n": len(records)},
            "task": "vqa", "mode": "constrained", "decoding": {"beam": 1, "max_new_tokens": 8}, "primary": "accuracy",
            "metrics": compute_metrics("vqa", predictions, records), "timing": {"seconds": 1.5, "samples_per_s": 2.7},
            "predictions_file": str(predictions_file), "samples": sample_rows(records, predictions, hits, 10)}


def _report(tmp_path, checkpoint="base", parameters=100, predictions=("yes", "yes", "ct", "kidney")):
    records = _vqa_records(tmp_path)
    run = {"config": {"eval": {"mode": "constrained"}}, "environment": {"processes": 1}, "timing": {"total_s": 2.0}}
    return new_report([run], [_evaluation(records, list(predictions), checkpoint, parameters, tmp_path)])


def _numbers(report):
    for e in report["evaluations"]:
        yield from e["metrics"]["scores"].values()
        for groups in e["metrics"]["groups"].values():
            yield from (g["accuracy"] for g in groups.values())


def test_report_files_agree_with_json_and_embed_images(tmp_path):
    paths = write_report(_report(tmp_path), tmp_path / "out")
    report = json.loads(paths["json"].read_text())
    markdown, page = paths["md"].read_text(), paths["html"].read_text()
    assert report["evaluations"][0]["metrics"]["scores"]["accuracy"] == 50.0
    for value in _numbers(report):
        assert fmt(value) in markdown and fmt(value) in page
    # every <img> is a data URI: charts as PNG, sample thumbnails as JPEG; nothing external
    sources = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert any(s.startswith("data:image/jpeg") for s in sources)  # thumbnails
    assert sum(s.startswith("data:image/png") for s in sources) >= 3  # scores, category bars, confusion
    assert not re.search(r'(src|href)="(https?:|file:|/)', page)
    confusion = report["evaluations"][0]["metrics"]["confusion"]["matrix"]
    assert confusion == [[1, 0, 0], [1, 0, 0]]
    lines = (tmp_path / "base.jsonl").read_text().splitlines()
    assert [json.loads(line)["prediction"] for line in lines] == ["yes", "yes", "ct", "kidney"]


def test_merge_puts_checkpoints_side_by_side(tmp_path):
    large = _report(tmp_path, "large", 400, predictions=("yes", "no", "ct", "liver"))
    base = _report(tmp_path, "base", 100)
    write_report(large, tmp_path / "large")
    write_report(base, tmp_path / "base")
    merged = merge_reports([tmp_path / "large" / "report.json", tmp_path / "base"], tmp_path / "compare")
    assert [e["checkpoint"]["name"] for e in merged["evaluations"]] == ["large", "base"]
    assert [e["run"] for e in merged["evaluations"]] == [0, 1]
    markdown = (tmp_path / "compare" / "report.md").read_text()
    # summary row: dataset, task, metric, then checkpoints by size (base before large)
    assert "| vqa_rad/test | vqa | accuracy | 50.00 | 100.00 |" in markdown
    page = (tmp_path / "compare" / "report.html").read_text()
    assert page.count('alt="checkpoints side by side"') == 1


def test_merge_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no report.json"):
        merge_reports([tmp_path / "nowhere"], tmp_path / "out")


def test_merge_tells_apart_checkpoints_that_share_a_name(tmp_path):
    for run, predictions in (("run_a", ("yes", "no", "ct", "liver")), ("run_b", ("no", "no", "mri", "liver"))):
        report = _report(tmp_path, "export", 100, predictions)
        report["evaluations"][0]["checkpoint"]["fingerprint"] = run  # different weights, same directory name
        write_report(report, tmp_path / run)
    merged = merge_reports([tmp_path / "run_a", tmp_path / "run_b"], tmp_path / "compare")
    assert [e["checkpoint"]["name"] for e in merged["evaluations"]] == ["export (run_a)", "export (run_b)"]
    markdown = (tmp_path / "compare" / "report.md").read_text()
    assert "| vqa_rad/test | vqa | accuracy | 100.00 | 50.00 |" in markdown
    assert "not directly comparable" not in markdown  # both runs saw the same records


def test_merge_flags_datasets_evaluated_on_different_records(tmp_path):
    write_report(_report(tmp_path, "base", 100), tmp_path / "a")
    other = _report(tmp_path, "large", 400)
    other["evaluations"][0]["dataset"]["fingerprint"] = "f" * 64  # e.g. another eval.max_samples
    write_report(other, tmp_path / "b")
    merge_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "compare")
    for name in ("report.md", "report.html"):
        assert "vqa_rad/test was evaluated on different records" in (tmp_path / "compare" / name).read_text()
