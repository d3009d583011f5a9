"""Report files: they exist, their numbers agree with report.json, images are embedded, every evaluation is shown with
how it was scored, and merging compares runs without hiding any evaluation."""

import json
import re

import pytest
from PIL import Image

from scaling.config import Decoding
from scaling.data.records import CLOSED, OPEN, ImageRef, Record
from scaling.data.tasks import get_task
from scaling.evaluation import report as report_module
from scaling.evaluation.baselines import compute_baselines
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
from scaling.evaluation.runner import candidate_summary

CANDIDATES = ["ct", "kidney", "mri", "no", "yes"]  # 'liver', a reference, is missing


def _vqa_records(tmp_path):
    image = tmp_path / "scan.png"
    Image.new("L", (40, 30), 120).save(image)
    rows = [("is there a lesion?", "yes", CLOSED, "PRES"), ("is it normal?", "no", CLOSED, "ABN"),
            ("what modality?", "ct", OPEN, "MODALITY"), ("which organ?", "liver", OPEN, "ORGAN")]
    return [Record(id=f"q{i}", task="vqa", image=ImageRef(path=image), text={"question": q, "object": "chest"},
                   target=a, answer_type=t, candidates=CANDIDATES,
                   attributes={"category": c, "candidates_from": "answers of the train+validation splits"})
            for i, (q, a, t, c) in enumerate(rows)]


def _train_records():
    answers = [("is there a lesion?", "no", CLOSED), ("is there a lesion?", "no", CLOSED),
               ("is it normal?", "yes", CLOSED), ("what modality?", "mri", OPEN), ("which organ?", "liver", OPEN)]
    return [Record(id=f"t{i}", task="vqa", image=None, text={"question": q}, target=a, answer_type=t)
            for i, (q, a, t) in enumerate(answers)]


def _evaluation(records, predictions, checkpoint, parameters, out_dir, mode="constrained"):
    hits = vqa_hits(predictions, records)
    predictions_file = write_predictions(out_dir / "predictions" / f"{checkpoint}-{mode}.jsonl", records, predictions,
                                         hits)
    return {"run": 0, "checkpoint": {"name": checkpoint, "path": f"/ckpt/{checkpoint}", "fingerprint": checkpoint * 8,
                                     "parameters": parameters},
            "dataset": {"name": "vqa_rad/test", "source": "vqa_rad", "split": "test", "path": None,
                        "fingerprint": records_fingerprint(records), "n": len(records)},
            "task": "vqa", "mode": mode, "decoding": {"beam": 1, "max_new_tokens": 8}, "prompt_type": "prev_output",
            "primary": "accuracy", "candidates": candidate_summary(records, get_task("vqa"), Decoding(mode=mode)),
            "metrics": compute_metrics("vqa", predictions, records),
            "baselines": {"fitted_on": "vqa_rad train split, 5 records",
                          "rows": compute_baselines("vqa", _train_records(), records)},
            "timing": {"seconds": 1.5, "samples_per_s": 2.7},
            "predictions_file": str(predictions_file.relative_to(out_dir)),
            "samples": sample_rows(records, predictions, hits, 10)}


def _report(tmp_path, out_dir, checkpoint="base", parameters=100, predictions=("yes", "yes", "ct", "kidney"),
            mode="constrained"):
    records = _vqa_records(tmp_path)
    run = {"config": {"eval": {"mode": mode}}, "environment": {"processes": 1}, "timing": {"total_s": 2.0}}
    return new_report([run], [_evaluation(records, list(predictions), checkpoint, parameters, out_dir, mode)])


def _written(tmp_path, name, **kwargs):
    """A report written into tmp_path/name, as recipes/evaluate.py leaves it (predictions/ beside report.json)."""
    out = tmp_path / name
    write_report(_report(tmp_path, out, **kwargs), out)
    return out


def _numbers(report):
    for e in report["evaluations"]:
        yield from e["metrics"]["scores"].values()
        for groups in e["metrics"]["groups"].values():
            yield from (g["accuracy"] for g in groups.values())
        for scorer in e["metrics"]["scorers"].values():
            yield from scorer["scores"].values()
        for baseline in e["baselines"]["rows"]:
            yield from baseline["scores"].values()


def test_report_files_agree_with_json_and_embed_images(tmp_path):
    out = _written(tmp_path, "out")
    report = json.loads((out / "report.json").read_text())
    markdown, page = (out / "report.md").read_text(), (out / "report.html").read_text()
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
    lines = (out / "predictions" / "base-constrained.jsonl").read_text().splitlines()
    assert [json.loads(line)["prediction"] for line in lines] == ["yes", "yes", "ct", "kidney"]


def test_report_states_how_it_scored(tmp_path):
    """Scorer and normalisation, candidate count and origin, the baselines beside the score, the other protocols."""
    out = _written(tmp_path, "out")
    for text in ((out / "report.md").read_text(), (out / "report.html").read_text()):
        assert "Exact match after normalising" in text and "dot inside a number" in text
        assert "5 answers from answers of the train+validation splits; 3 of 4 references are among them" in text
        assert "Baselines, fitted on the vqa_rad train split" in text
        for name in ("majority answer", "majority per answer type", "question-only"):
            assert f"baseline: {name}" in text
        assert "Other protocols, same predictions" in text
        for scorer in ("biomedgpt", "llava_med", "mile"):
            assert f"Scorer {scorer}:" in text
        assert "prompt_type=prev_output" in text
    # the best baseline beside the model: 'no' for closed and 'liver' for open questions gets 2 of 4
    assert "| vqa_rad/test (constrained) | vqa | accuracy | 50.00 | 50.00 (majority per answer type) |" in (
        out / "report.md").read_text()


def test_sample_table_shows_what_the_model_read(tmp_path):
    """The VQA prompt is the question: the `object` field (used only with add_object) is not shown as input."""
    rows = sample_rows(_vqa_records(tmp_path), ["yes"] * 4, [True] * 4, 2)
    assert [r["question"] for r in rows] == ["is there a lesion?", "is it normal?"]
    assert sample_rows(_vqa_records(tmp_path), ["yes"], [True], 1, ["Question: x Options: (a) yes"])[0]["question"] \
        == "Question: x Options: (a) yes"


def test_headline_chart_uses_the_full_scale(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(report_module, "_figure_uri", lambda figure: figures.append(figure) or "data:image/png;")
    report = _report(tmp_path, tmp_path, predictions=("no", "yes", "mri", "kidney"))  # 0 %
    report_module.chart_primary_scores(report)
    assert figures[0].axes[0].get_ylim() == pytest.approx((0.0, 105.0))


def test_merge_keeps_every_evaluation_of_one_model(tmp_path):
    """One model decoded two ways (and one way twice, in two runs): every evaluation has its summary cell."""
    generate = _written(tmp_path, "generate", predictions=("yes", "no", "ct", "kidney"), mode="generate")
    constrained = _written(tmp_path, "constrained")
    again = _written(tmp_path, "again", predictions=("no", "no", "ct", "liver"))
    merged = merge_reports([generate, constrained, again], tmp_path / "compare")
    assert [e["mode"] for e in merged["evaluations"]] == ["generate", "constrained", "constrained"]
    markdown = (tmp_path / "compare" / "report.md").read_text()
    assert "| dataset (mode) | task | metric | base | best baseline |" in markdown
    assert "| vqa_rad/test (generate) | vqa | accuracy | 75.00 |" in markdown
    assert "| vqa_rad/test (constrained, run 1) | vqa | accuracy | 50.00 |" in markdown
    assert "| vqa_rad/test (constrained, run 2) | vqa | accuracy | 75.00 |" in markdown
    assert markdown.count("## base on vqa_rad/test") == 3


def test_merged_prediction_links_resolve(tmp_path):
    sources = [_written(tmp_path, "a"), _written(tmp_path, "b", checkpoint="large", parameters=400)]
    merged = merge_reports(sources, tmp_path / "reports" / "compare")
    page = (tmp_path / "reports" / "compare" / "report.html").read_text()
    for evaluation in merged["evaluations"]:
        link = evaluation["predictions_file"]
        assert (tmp_path / "reports" / "compare" / link).is_file(), link
        assert f'href="{link}"' in page


def test_merge_puts_checkpoints_side_by_side(tmp_path):
    large = _written(tmp_path, "large", checkpoint="large", parameters=400, predictions=("yes", "no", "ct", "liver"))
    base = _written(tmp_path, "base")
    merged = merge_reports([large / "report.json", base], tmp_path / "compare")
    assert [e["checkpoint"]["name"] for e in merged["evaluations"]] == ["large", "base"]
    assert [e["run"] for e in merged["evaluations"]] == [0, 1]
    markdown = (tmp_path / "compare" / "report.md").read_text()
    # summary row: dataset (mode), task, metric, then checkpoints by size (base before large), the best baseline
    assert "| vqa_rad/test (constrained) | vqa | accuracy | 50.00 | 100.00 | 50.00 (majority per answer type) |" \
        in markdown
    page = (tmp_path / "compare" / "report.html").read_text()
    assert page.count('alt="checkpoints side by side"') == 1


def test_merge_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no report.json"):
        merge_reports([tmp_path / "nowhere"], tmp_path / "out")


def test_merge_tells_apart_checkpoints_that_share_a_name(tmp_path):
    for run, predictions in (("run_a", ("yes", "no", "ct", "liver")), ("run_b", ("no", "no", "mri", "liver"))):
        report = _report(tmp_path, tmp_path / run, "export", 100, predictions)
        report["evaluations"][0]["checkpoint"]["fingerprint"] = run  # different weights, same directory name
        write_report(report, tmp_path / run)
    merged = merge_reports([tmp_path / "run_a", tmp_path / "run_b"], tmp_path / "compare")
    assert [e["checkpoint"]["name"] for e in merged["evaluations"]] == ["export (run_a)", "export (run_b)"]
    markdown = (tmp_path / "compare" / "report.md").read_text()
    assert "| vqa_rad/test (constrained) | vqa | accuracy | 100.00 | 50.00 |" in markdown
    assert "not directly comparable" not in markdown  # both runs saw the same records


def test_merge_flags_datasets_evaluated_on_different_records(tmp_path):
    _written(tmp_path, "a")
    other = _report(tmp_path, tmp_path / "b", "large", 400)
    other["evaluations"][0]["dataset"]["fingerprint"] = "f" * 64  # e.g. another eval.max_samples
    write_report(other, tmp_path / "b")
    merge_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "compare")
    for name in ("report.md", "report.html"):
        assert "vqa_rad/test was evaluated on different records" in (tmp_path / "compare" / name).read_text()
