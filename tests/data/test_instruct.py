"""Instruction formatting: options hold the answer at a uniform position, seeded, and files read back."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from scaling.data.instruct import (
    CandidatePools,
    InstructionFormatter,
    format_options,
    pool_name,
    write_instruction_file,
)
from scaling.data.records import DataError, Record
from scaling.data.sources import load_source
from scaling.data.synthetic import generate_synthetic
from scaling.data.tasks import normalize_answer

VQA_RAD = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "vqa_rad"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synthetic"), n_images=60, seed=1, image_size=32)


@pytest.fixture(scope="module")
def vqa_records(synthetic):
    return load_source("slake", synthetic.sources["vqa"].path, "train").records


def test_answer_is_among_the_options_of_every_closed_and_open_item(vqa_records):
    formatter = InstructionFormatter(CandidatePools.from_records(vqa_records), seed=0)
    kinds = collections.Counter()
    for record in vqa_records:
        instruction = formatter(record)
        answer = normalize_answer(record.target)
        assert instruction.target == " " + answer
        if instruction.options:
            kinds[record.answer_type] += 1
            assert instruction.options[instruction.answer_index] == answer
            assert format_options(instruction.options) in instruction.prompt
            assert len(set(instruction.options)) == len(instruction.options)
    assert kinds["OPEN"] > 50 and kinds["CLOSED"] > 50


def test_answer_position_is_uniform(vqa_records):
    formatter = InstructionFormatter(CandidatePools.from_records(vqa_records), seed=0)
    four, two = collections.Counter(), collections.Counter()
    for epoch in range(3):
        for record in vqa_records:
            instruction = formatter(record, epoch)
            {4: four, 2: two}.get(len(instruction.options), collections.Counter())[instruction.answer_index] += 1
    for counts, n in ((four, 4), (two, 2)):
        total = sum(counts.values())
        assert total > 400
        assert all(abs(counts[i] / total - 1 / n) < 0.05 for i in range(n)), counts


def test_distractors_come_from_the_answer_pool_of_the_same_kind(vqa_records):
    pools = CandidatePools.from_records(vqa_records)
    assert set(pools.pools["modality"]) == {"ct", "mri", "x-ray", "ultrasound"}
    assert set(pools.pools["plane"]) == {"axial", "coronal", "sagittal"}
    formatter = InstructionFormatter(pools, seed=0)
    for record in vqa_records:
        if pool_name(record) == "modality" and record.answer_type == "OPEN":
            assert set(formatter(record).options) <= set(pools.pools["modality"]) | {""}


def test_formatting_is_deterministic_in_seed_and_varies_with_seed_and_epoch(vqa_records):
    pools = CandidatePools.from_records(vqa_records)
    first = [InstructionFormatter(pools, seed=5)(r) for r in vqa_records]
    assert first == [InstructionFormatter(pools, seed=5)(r) for r in vqa_records]
    assert first != [InstructionFormatter(pools, seed=6)(r) for r in vqa_records]
    assert first != [InstructionFormatter(pools, seed=5)(r, epoch=1) for r in vqa_records]


def test_first_template_mode_fixes_the_wording_for_evaluation(vqa_records):
    formatter = InstructionFormatter(CandidatePools.from_records(vqa_records), template_choice="first")
    prompts = [formatter(r, epoch).prompt for r in vqa_records[:30] for epoch in range(2)]
    assert all(p.startswith(" Question: ") and p.endswith(" The answer is:") for p in prompts)


def test_other_tasks_offer_their_own_candidates_or_none(synthetic):
    formatter = InstructionFormatter(seed=0)
    for task, options in (("nli", {"yes", "no", "maybe"}), ("qa", {"yes", "no", "maybe"}),
                          ("classify", {"normal", "abnormal"}), ("caption", set()), ("summarize", set())):
        source = synthetic.sources[task]
        for record in load_source(source.loader, source.path, "test", **source.options).records[:20]:
            instruction = formatter(record)
            assert set(instruction.options) in (options, set())  # templates without options exist
            if options and instruction.options:
                assert instruction.options[instruction.answer_index] == normalize_answer(record.target)


def test_conversation_style_carries_earlier_turns():
    record = Record(id="c1", task="vqa", image=None, text={"question": "And its size?", "context": "USER: Where?"},
                    target="small", attributes={"category": "Size"})
    instruction = InstructionFormatter(CandidatePools({"size": ["small", "large"]}), style="conversation")(record)
    assert instruction.prompt.startswith(" USER: Where? USER: And its size?")
    assert instruction.prompt.endswith("ASSISTANT:") and set(instruction.options) == {"small", "large"}


def test_instruction_file_is_read_back_by_the_llava_med_loader(vqa_records, tmp_path):
    formatter = InstructionFormatter(CandidatePools.from_records(vqa_records), seed=0)
    options = write_instruction_file(vqa_records, formatter, tmp_path / "instruct" / "train.json")
    loaded = load_source("llava_med", tmp_path / "instruct" / "train.json", "train", on_bad_record="error",
                         verify_images=True, **options)
    assert len(loaded.records) == len(vqa_records)
    for original, record in zip(vqa_records, loaded.records, strict=True):
        instruction = formatter(original)
        assert record.text["question"] == instruction.prompt.strip()
        assert record.target == instruction.target.strip()
        assert record.image.path.read_bytes() == original.image.path.read_bytes()


def test_text_only_records_are_refused_with_the_fix(tmp_path):
    record = Record(id="n1", task="nli", image=None, text={"sentence1": "a", "sentence2": "b"}, target="yes",
                    source="mli_train_v1.jsonl", index=4)
    with pytest.raises(DataError, match=r"mli_train_v1.jsonl: record 4 \(n1, task nli\) has no image.*Fix"):
        write_instruction_file([record], InstructionFormatter(), tmp_path / "train.json")


def test_real_vqa_rad_converts_with_the_answer_among_the_options():
    if not VQA_RAD.is_dir():
        pytest.skip(f"real VQA-RAD not available at {VQA_RAD.resolve()} (../shared/data is absent)")
    root = VQA_RAD
    records = load_source("vqa_rad", root, "test").records
    formatter = InstructionFormatter(CandidatePools.from_records(load_source("vqa_rad", root, "train").records))
    with_options = 0
    for record in records:
        instruction = formatter(record)
        if instruction.options:
            with_options += 1
            assert instruction.options[instruction.answer_index] == normalize_answer(record.target)
    assert with_options > len(records) / 2
