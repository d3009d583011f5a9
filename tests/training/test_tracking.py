"""The JSONL step log (append, truncate on resume, torn lines) and the loss-curve PNG."""

import json

from scaling.training.tracking import METRICS_FILE, MetricsLog, plot_loss, read_metrics, truncate_metrics


def test_metrics_log_writes_one_line_per_step_and_truncates_for_resume(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 6):
        log.log({"loss": 1.0 / step, "lr": 1e-3}, step=step)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert truncate_metrics(tmp_path, 3) == 2
    log.log({"loss": 0.1, "lr": 1e-3}, step=4)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_a_torn_last_line_from_a_kill_is_ignored(tmp_path):
    (tmp_path / METRICS_FILE).write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


def test_non_finite_values_stay_valid_json(tmp_path):
    MetricsLog(tmp_path).log({"loss": float("nan")}, step=1)
    assert read_metrics(tmp_path)[0]["loss"] == "nan"


def test_plot_loss_writes_a_png(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 4):
        log.log({"loss": 3.0 - step, "lr": 1e-3 * step}, step=step)
    path = plot_loss(tmp_path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
