"""The MILE study as data: grids against MILE's published tables, row labels and configs, both metric definitions on a
hand-made prediction set, and the replication report's verdicts."""

import json
from pathlib import Path

import pytest

from scaling.config import ConfigError, load_config
from scaling.data.records import CLOSED, OPEN, Record
from scaling.evaluation.metrics import compute_metrics
from scaling.evaluation.replication import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    replication,
    seed_noise,
    write_replication,
)
from scaling.sweep import (
    GRIDS,
    METRIC_NOTE,
    MILE_TABLES,
    Row,
    grid_labels,
    markdown_table,
    published,
    row_config,
    run_rows,
    table_row,
)

# The rows of MILE's README tables (TIMMY-CHAN/MILE at 34e00c5), in their order, written out again by hand.
README_ROWS = {
    "mile_table1": ["F-LoRA-LoRA:4", "F-LoRA-LoRA:8", "LoRA-LoRA-LoRA:4", "LoRA-LoRA-LoRA:8", "F-T-LoRA:4",
                    "F-T-LoRA:8", "T-LoRA-LoRA:4", "T-LoRA-LoRA:8", "T-T-LoRA:4", "T-T-LoRA:8"],
    "mile_table2": ["F-F-Prefix", "F-Prefix-Prefix", "T-Prefix-Prefix", "T-T-Prefix"],
    "mile_table3": ["F-IA3-IA3", "IA3-IA3-IA3", "T-IA3-IA3", "F-T-IA3", "T-T-IA3"],
    "mile_table4": ["F-PTv2-PTv2", "F-F-PTv2", "T-PTv2-PTv2", "T-T-PTv2"],
    "mile_table8": ["T-T-T", "T-T-LoRA", "T-T-Prefix", "T-T-IA3", "T-T-PTv2"],
}


def policies(labels: list[str]) -> list[tuple]:
    return [tuple(sorted(Row.parse(label).policy.items())) + (Row.parse(label).data,) for label in labels]


@pytest.mark.parametrize("name", sorted(README_ROWS))
def test_table_grids_hold_miles_rows_in_order(name):
    assert policies(GRIDS[name]) == policies(README_ROWS[name])
    assert list(MILE_TABLES[name]) == GRIDS[name]
    assert [p.row for p in MILE_TABLES[name].values()] == list(range(1, len(README_ROWS[name]) + 1))


def test_combined_grids_cover_every_row_of_tables_1_to_4():
    every_row = ["T-T-T"] + [label for n in ("mile_table1", "mile_table2", "mile_table3", "mile_table4")
                             for label in README_ROWS[n]]
    assert GRIDS["mile_tables1_4"] == every_row
    assert {"T-T-IA3", "T-PTv2-PTv2", "T-T-PTv2", "T-T-LoRA:8", "F-LoRA-LoRA:8"} <= set(every_row)
    assert GRIDS["mile_tables6_7"] == [f"{label}/instruction" for label in every_row]
    assert [Row.parse(label).data for label in GRIDS["mile_table5"]] == ["origin", "instruction", "origin+instruction"]
    assert all(Row.parse(label).policy_label == "T-T-T" for label in GRIDS["mile_table5"])


def test_published_numbers_are_miles():
    f_t_lora = MILE_TABLES["mile_table1"]["F-T-LoRA:4"]
    assert (f_t_lora.params_pct, f_t_lora.memory_gb, f_t_lora.opened, f_t_lora.closed, f_t_lora.overall) == \
        (38.022, 7.26, 47.76, 70.70, 55.53)
    assert MILE_TABLES["mile_table2"]["T-T-Prefix"].closed == 82.25
    assert MILE_TABLES["mile_table4"]["F-F-PTv2"].params_pct == 0.051
    assert MILE_TABLES["mile_table8"]["T-T-IA3"].overall == 60.01
    assert published("proxy", Row.parse("T-T-LoRA:4/seed2")).citation == "MILE Table 1 (MILE-LoRA), row 9"
    assert published("mile_table8", Row.parse("T-T-LoRA")).params_pct == 50.76
    assert published("mile_tables6_7", Row.parse("T-T-LoRA:4/instruction")) is None  # Tables 6-7: not published here


def test_row_labels_parse_and_refuse_with_the_reason():
    row = Row.parse("F-LoRA-LoRA:8@nf4/origin+instruction/seed2")
    assert row.policy == {"vision": "freeze", "encoder": "lora", "decoder": "lora", "r": 8, "quantize": "nf4"}
    assert (row.data, row.seed, row.policy_label, row.first_seed_label) == \
        ("origin+instruction", 2, "F-LoRA-LoRA:8@nf4", "F-LoRA-LoRA:8@nf4/origin+instruction")
    assert row.start_row.label == "T-T-T/seed2" and Row.parse("T-T-LoRA:4").start_row is None
    assert Row.parse("T-T-T").with_seed(1).label == "T-T-T"
    for bad, reason in (("F-LoRA", "VISION-ENCODER-DECODER"), ("F-T-LoRA:0", "positive integer"),
                        ("F-T-LoRA@fp8", "nf4 or int8"), ("T-T-T/chat", "unknown suffix")):
        with pytest.raises(ValueError, match=reason):
            Row.parse(bad)
    slugs = [Row.parse(label).slug for grid in GRIDS.values() for label in grid]
    assert all("/" not in s and ":" not in s for s in slugs)


def test_sweep_keys_are_checked_before_any_work():
    cases = [(["peft.grid=table9"], "is not a grid"),
             (["peft.sweep=[T-T-T, T-T-T]"], "appears twice"),
             (["peft.sweep=[T-T-T/origin+instruction]"], "put that row before it"),
             (["peft.sweep=[T-T-T]", "peft.sweep_repeat=[F-X-LoRA]"], "peft.sweep_repeat"),
             (["peft.sweep=[T-T-T]", "peft.sweep_row=F-F-PTv2"], "is not a row of this sweep")]
    for overrides, message in cases:
        problems = load_config(None, overrides).problems()
        assert any(message in p for p in problems), (overrides, problems)
    assert not load_config(None, ["peft.grid=proxy", "peft.sweep_repeat=[T-T-T]", "peft.sweep_row=T-T-T/seed2"]
                           ).problems()
    with pytest.raises(ConfigError, match="is not a grid"):
        load_config(None, ["peft.grid=table9"]).validate()


def test_row_config_applies_policy_data_seed_and_start(tmp_path):
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "peft.sweep_pretrain_steps=10", "train.max_steps=7",
                             "peft.grid=mile_table5", "peft.sweep_repeat=[T-T-T/origin+instruction]"])
    assert grid_labels(cfg.peft)[-1] == "T-T-T/origin+instruction/seed2"
    assert grid_labels(load_config(None, ["peft.sweep=[T-T-T]", "peft.sweep_repeat=[T-T-T, F-T-LoRA:4]"]).peft) == \
        ["T-T-T", "T-T-T/seed2"]  # only rows of the sweep are repeated
    lora = row_config(cfg, Row.parse("F-T-LoRA:4/seed2"))
    assert (lora.peft.vision, lora.peft.encoder, lora.peft.decoder, lora.peft.r) == ("freeze", "full", "lora", 4)
    assert (lora.train.seed, lora.train.save_every, lora.data.instruction) == (cfg.train.seed + 1, 8, False)
    assert lora.data.synthetic_seed == cfg.train.seed  # the repeat trains and is scored on the first seed's data
    assert lora.model.checkpoint == str(tmp_path / "pretrain" / "model")
    assert lora.model.tokenizer == str(tmp_path / "tokenizer")
    assert lora.train.output_dir == str(tmp_path / "rows" / "F-T-LoRA_r4_seed2")
    tuned = row_config(cfg, Row.parse("T-T-T/origin+instruction"))
    assert tuned.data.instruction and tuned.model.checkpoint == str(tmp_path / "rows" / "T-T-T" / "model")


def record(i: int, target: str, answer_type: str) -> Record:
    return Record(id=f"q{i}", task="vqa", image=None, text={"question": f"question {i}?"}, target=target,
                  answer_type=answer_type)


# MILE: Closed = yes/no references (q1, q2, q4, q7), Opened = the rest (q3, q5, q6);
# dataset: CLOSED = q1, q2, q3, q7, OPEN = q4, q5, q6
HAND_MADE = [(record(1, "yes", CLOSED), "Yes"), (record(2, "no", CLOSED), "yes"), (record(3, "left", CLOSED), "left"),
             (record(4, "yes", OPEN), "maybe"), (record(5, "MRI", OPEN), "mri"), (record(6, "2", OPEN), "two"),
             (record(7, "no", CLOSED), "no lesion")]


def test_table_row_carries_both_metric_definitions(tmp_path):
    records, predictions = [r for r, _ in HAND_MADE], [p for _, p in HAND_MADE]
    scores = {f"rad/{k}": v for k, v in compute_metrics("vqa", predictions, records)["scores"].items()}
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "peft.sweep=[F-T-LoRA:4]"])
    row_cfg = row_config(cfg, Row.parse("F-T-LoRA:4"))
    counts = {"all": {"trainable_pct": 40.0, "trainable": 4, "total": 10}}
    measured = {"memory_mib": 1.0, "memory_kind": "peak RSS", "pid": 1, "final_loss": 0.5, "seconds": 1.0,
                "n_closed": 4, "n_opened": 3}
    row = table_row(row_cfg, counts, scores, measured)
    assert row["closed"] == pytest.approx(100 * 1 / 4)  # MILE: yes/no references; "no lesion" is not an answer
    assert row["opened"] == pytest.approx(100 * 3 / 3)
    assert row["global"] == pytest.approx(100 * 4 / 7)
    assert row["answer_type_closed"] == pytest.approx(100 * 2 / 4)
    assert row["answer_type_open"] == pytest.approx(100 * 2 / 3)
    assert (row["ViT"], row["JTM"], row["Dec"], row["rank"]) == ("F", "T", "LoRA", 4)

    # two test sets: each accuracy is their mean
    other = {f"slake/{k}": 0.0 for k in ("accuracy", "yes_no_accuracy", "non_yes_no_accuracy", "open_accuracy",
                                          "closed_accuracy")}
    assert table_row(row_cfg, counts, {**scores, **other}, measured)["closed"] == pytest.approx(12.5)
    table = markdown_table([row])
    assert "| Opened | Closed | Global | Open (answer_type) | Closed (answer_type) |" in table
    assert METRIC_NOTE in table


def result(label: str, overall: float, params: float = 50.0) -> dict:
    return {"label": label, "global": overall, "opened": overall, "closed": overall, "answer_type_open": overall,
            "answer_type_closed": overall, "params_pct": params, "memory_mib": 100.0, "n_closed": 500,
            "n_opened": 500}


PROXY = {"T-T-T": (80.0, 100.0), "T-T-T/seed2": (79.0, 100.0), "F-T-LoRA:4": (50.0, 40.0),
         "T-T-LoRA:4": (79.5, 60.0), "F-LoRA-LoRA:4": (30.0, 1.0), "T-LoRA-LoRA:4": (60.0, 20.0),
         "T-T-Prefix": (78.0, 62.0), "T-T-IA3": (60.0, 59.0), "T-T-PTv2": (65.0, 59.5),
         "T-T-T/instruction": (70.0, 100.0), "T-T-T/origin+instruction": (85.0, 100.0)}


def verdicts(table: list[dict], **overrides) -> dict[str, str]:
    cfg = load_config(None, ["peft.grid=proxy", "peft.sweep_repeat=[T-T-T]", *overrides.get("cli", [])])
    return {f["key"]: f["verdict"] for f in replication(table, cfg)["findings"]}


def test_findings_follow_the_measured_noise():
    table = [result(label, *values) for label, values in PROXY.items()]
    assert seed_noise(table)["points"] == pytest.approx(1.0)
    assert verdicts(table) == dict.fromkeys("abcde", REPRODUCED)

    # effects smaller than the seed noise are not reproductions
    noisy = [result("T-T-T/seed2", 45.0, 100.0) if r["label"] == "T-T-T/seed2" else r for r in table]
    assert seed_noise(noisy)["points"] == pytest.approx(35.0)
    assert verdicts(noisy) == {"a": NOT_REPRODUCED, "b": REPRODUCED, "c": NOT_REPRODUCED, "d": NOT_REPRODUCED,
                               "e": NOT_REPRODUCED}
    # nor are effects above the noise but within twice it
    thin = [result(r["label"], 81.5) if r["label"] == "T-T-T/origin+instruction" else r for r in table]
    assert seed_noise(thin)["margin"] == pytest.approx(2.0) and verdicts(thin)["e"] == NOT_REPRODUCED
    # reversed effects are not reproductions either (PEFT above global fine-tuning still "matches" it)
    reversed_ = [result(r["label"], 100 - r["global"], r["params_pct"]) for r in table]
    assert verdicts(reversed_) == {**dict.fromkeys("acde", NOT_REPRODUCED), "b": REPRODUCED}


def test_findings_without_their_rows_or_the_noise_are_inconclusive():
    table = [result(label, *values) for label, values in PROXY.items()]
    without_repeat = [r for r in table if r["label"] != "T-T-T/seed2"]
    found = replication(without_repeat, load_config(None, ["peft.grid=proxy"]))
    assert {f["verdict"] for f in found["findings"]} == {INCONCLUSIVE}
    assert all("seed noise not measured" in f["evidence"] for f in found["findings"])
    partial = [r for r in table if r["label"] in ("T-T-T", "T-T-T/seed2", "T-T-LoRA:4")]
    assert verdicts(partial) == {"a": INCONCLUSIVE, "b": REPRODUCED, "c": INCONCLUSIVE, "d": INCONCLUSIVE,
                                 "e": INCONCLUSIVE}


def test_replication_report_is_written_with_miles_numbers_beside_ours(tmp_path):
    table = [result(label, *values) for label, values in PROXY.items()]
    cfg = load_config(None, ["peft.grid=proxy", "peft.sweep_repeat=[T-T-T]"])
    paths = write_replication(table, cfg, tmp_path, failed=["T-T-IA3/seed2"])
    markdown = paths["md"].read_text()
    for text in ("## Findings", "## Seed noise", "## Rows beside MILE", "## Failed rows", "T-T-IA3/seed2",
                 "MILE Table 1 (MILE-LoRA), row 9", "| 61.887 |", "| 78.83 |", "Table 8 (BiomedGPT-Tiny"):
        assert text in markdown, text
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 2 and 'class="reproduced"' in page
    assert Path(paths["json"]).is_file()


FAKE_ROW = """
import json, sys, time
from pathlib import Path
label = next(a for a in sys.argv if a.startswith("peft.sweep_row=")).split("=", 1)[1]
assert "train.cpu_threads=1" in sys.argv
log = Path(sys.argv[2]).parent / "log.jsonl"
with log.open("a") as f:
    f.write(json.dumps({"label": label, "event": "start", "t": time.time()}) + "\\n")
time.sleep(0.6)
with log.open("a") as f:
    f.write(json.dumps({"label": label, "event": "end", "t": time.time()}) + "\\n")
sys.exit(3 if label == "T-T-T" else 0)
"""


def test_rows_side_by_side_wait_for_their_start_row_and_skip_it_when_it_failed(tmp_path):
    """run_rows with 2 processes on a stand-in recipe that logs its start and end and fails for T-T-T."""
    recipe, config_file = tmp_path / "fake_row.py", tmp_path / "config.yaml"
    recipe.write_text(FAKE_ROW)
    config_file.write_text("")
    rows = [Row.parse(label) for label in ("T-T-T", "F-T-LoRA:4", "T-T-IA3", "T-T-T/origin+instruction")]
    finished = list(run_rows(None, recipe, config_file, rows, processes=2, threads=1))
    assert dict((row.label, status) for row, status in finished) == {
        "T-T-T": 3, "F-T-LoRA:4": 0, "T-T-IA3": 0, "T-T-T/origin+instruction": 1}
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "T-T-T/origin+instruction" not in {e["label"] for e in events}  # its start row failed: never run
    running, most = 0, 0
    for event in sorted(events, key=lambda e: (e["t"], e["event"] == "start")):
        running += 1 if event["event"] == "start" else -1
        most = max(most, running)
    assert most == 2
    assert (tmp_path / "rows" / "T-T-IA3" / "console.log").is_file()
