"""Decoding choice per task, the no-candidate fallback, length-ordered batches, and putting gathered predictions back
in order."""

import dataclasses

import pytest
import torch
from accelerate import Accelerator

from scaling.config import Config, Decoding, EvalArgs
from scaling.data.collate import Collator
from scaling.data.instruct import instruction_formatter
from scaling.data.records import Record
from scaling.data.tasks import get_task
from scaling.evaluation.runner import (
    _fallback_without_candidates,
    _in_dataset_order,
    _index_loader,
    candidate_summary,
    dataset_baselines,
    eval_collator,
    flat_metrics,
    predict_records,
)
from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.models.biomedgpt.tokenization import train_bpe_tokenizer


@pytest.mark.parametrize("task, mode, beam", [("vqa", "constrained", 1), ("caption", "generate", 10),
                                              ("classify", "score", 1), ("nli", "score", 1),
                                              ("summarize", "generate", 5), ("qa", "score", 1)])
def test_auto_mode_takes_biomedgpt_decoding(task, mode, beam):
    decoding = EvalArgs(mode="auto").decoding(get_task(task).decoding)
    assert (decoding.mode, decoding.beam) == (mode, beam)


def test_explicit_mode_takes_eval_values():
    decoding = EvalArgs(mode="generate", beam=3, max_new_tokens=7, no_repeat_ngram_size=2,
                        length_penalty=0.7).decoding(get_task("caption").decoding)
    assert decoding.as_dict() == {"mode": "generate", "beam": 3, "max_new_tokens": 7, "length_penalty": 0.7,
                                  "no_repeat_ngram_size": 2}


def test_eval_keys_carry_the_decoding_names_and_auto_mode_keeps_the_score_settings():
    assert {f.name for f in dataclasses.fields(Decoding)} <= {f.name for f in dataclasses.fields(EvalArgs)}
    decoding = EvalArgs(mode="auto", score_chunk=8, score_normalize="vocab").decoding(get_task("nli").decoding)
    assert decoding.as_dict() == {"mode": "score", "score_chunk": 8, "score_normalize": "vocab"}


def test_missing_candidates_fall_back_in_auto_mode_and_fail_in_explicit_mode():
    task = get_task("vqa")
    records = [Record(id="q1", task="vqa", image=None, text={"question": "what?"}, target="x", source="f.json",
                      index=3)]
    constrained = EvalArgs(mode="auto").decoding(task.decoding)
    assert _fallback_without_candidates(constrained, records, task, "llava", explicit=False).mode == "generate"
    with pytest.raises(ValueError, match=r"llava: eval.mode=constrained needs candidate answers.*'q1'.*index 3"):
        _fallback_without_candidates(constrained, records, task, "llava", explicit=True)


def test_gathered_predictions_return_to_dataset_order():
    assert _in_dataset_order([2, 0, 1], ["c", "a", "b"], 3) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="predicted twice"):
        _in_dataset_order([0, 1, 1], ["a", "b", "b"], 3)
    with pytest.raises(RuntimeError, match="never predicted"):
        _in_dataset_order([0, 2], ["a", "c"], 3)


def test_flat_metrics_name_dataset_and_score():
    evaluations = [{"dataset": {"name": "vqa_rad/test"}, "metrics": {"scores": {"closed_accuracy": 70.0}}},
                   {"dataset": {"name": "pubmedqa/test"}}]  # a non-main rank has no metrics
    assert flat_metrics(evaluations) == {"vqa_rad/test/closed_accuracy": 70.0}


def test_eval_collator_uses_instruction_prompts_when_configured():
    tokenizer = train_bpe_tokenizer(["is the lesion in the liver? yes no"] * 10, vocab_size=280, num_codes=0,
                                    num_bins=0)
    records = [Record(id=str(i), task="vqa", image=None, text={"question": "is there a lesion?"}, target=t,
                      attributes={"category": "PRES"}) for i, t in enumerate(["yes", "no", "liver", "kidney"])]
    model_config = BiomedGPTConfig.from_preset("test", vocab_size=len(tokenizer))
    cfg = Config()
    plain = eval_collator(tokenizer, cfg, model_config, instruction_formatter(cfg, records))(records)
    cfg.data.instruction = True
    instructed = eval_collator(tokenizer, cfg, model_config, instruction_formatter(cfg, records))(records)
    assert instructed["input_ids"].shape[1] > plain["input_ids"].shape[1]  # templates wrap the question
    again = eval_collator(tokenizer, cfg, model_config, instruction_formatter(cfg, records))(records)
    assert (again["input_ids"] == instructed["input_ids"]).all()  # deterministic prompts for evaluation


def test_prev_output_batches_follow_prompt_length_and_predictions_keep_dataset_order():
    questions = ["is there a lesion?", "is the lesion in the left lower lobe of the liver?", "what modality?"]
    answers = ["yes", "no", "ct"]
    tokenizer = train_bpe_tokenizer([*questions, *answers] * 10, vocab_size=300, num_codes=0, num_bins=0)
    records = [Record(id=str(i), task="vqa", image=None, text={"question": questions[i % 3]}, target=answers[i % 3],
                      candidates=answers) for i in range(12)]
    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_preset("test", vocab_size=len(tokenizer))).eval()
    collator = Collator(tokenizer, model.config.image_size, 64, 16, prompt_type="prev_output")

    batches = [batch["index"].tolist() for batch in _index_loader(records, collator, batch_size=4)]
    lengths = collator.prompt_lengths(records)
    assert sorted(i for b in batches for i in b) == list(range(12))
    assert [len({lengths[i] for i in b}) for b in batches] == [1, 1, 1]  # one prefix length, one decoding call each

    task = get_task("vqa")
    decoding = EvalArgs(mode="constrained").decoding(task.decoding)
    predicted = predict_records(model, tokenizer, records, task, decoding, Accelerator(cpu=True), collator, 4,
                                progress=False)
    alone = [predict_records(model, tokenizer, [r], task, decoding, Accelerator(cpu=True), collator, 1,
                             progress=False)[0] for r in records[:3]]
    assert predicted == alone * 4


def test_eval_collator_follows_the_exports_recorded_layout(caplog):
    tokenizer = train_bpe_tokenizer(["is there a lesion? yes no"] * 10, vocab_size=280, num_codes=0, num_bins=0)
    model_config = BiomedGPTConfig.from_preset("test", vocab_size=len(tokenizer))
    cfg = Config()
    cfg.data.prompt_type = "none"
    recorded = {"inference": {"recorded": True, "file": "export/inference.json", "prompt_type": "prev_output",
                              "max_src_len": 40, "max_tgt_len": 12, "instruction": {"with_options": "Q: {question}"}}}
    collator = eval_collator(tokenizer, cfg, model_config, None, recorded)
    assert (collator.prompt_type, collator.max_src_len, collator.max_tgt_len) == ("prev_output", 40, 12)
    assert "instead of the configured data.prompt_type=none" in caplog.text
    assert "trained with instruction prompts but data.instruction=False" in caplog.text
    unrecorded = eval_collator(tokenizer, cfg, model_config, None, {"inference": {"recorded": False}})
    assert unrecorded.prompt_type == "none" and cfg.data.prompt_type == "none"  # the config itself is untouched


def test_candidate_summary_counts_origin_and_reachable_references():
    vqa = [Record(id=str(i), task="vqa", image=None, text={"question": "q?"}, target=t, candidates=["yes", "no"],
                  attributes={"candidates_from": "answers of the train split"}) for i, t in enumerate(["Yes", "ct"])]
    summary = candidate_summary(vqa, get_task("vqa"), Decoding(mode="constrained"))
    assert summary == {"count": 2, "lists": 1, "origin": "answers of the train split", "references_listed": 1, "n": 2}
    assert candidate_summary(vqa, get_task("vqa"), Decoding(mode="generate")) is None
    nli = [Record(id="0", task="nli", image=None, text={"sentence1": "a", "sentence2": "b"}, target="maybe")]
    assert candidate_summary(nli, get_task("nli"), Decoding(mode="score"))["origin"] == "the task's fixed labels"


def test_baselines_come_from_the_sources_train_split(tmp_path):
    import json

    from PIL import Image

    from scaling.config import DataArgs, SourceArgs
    from scaling.data.loading import load_sources

    row = {"img_name": "a.png", "q_lang": "en", "answer_type": "CLOSED", "question": "is it normal?"}
    (tmp_path / "imgs").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "test.json").write_text(json.dumps([{**row, "qid": 1, "answer": "yes"}]))
    [split] = load_sources([SourceArgs(name="slake", path=str(tmp_path), split="test")], DataArgs())
    assert "train split could not be read" in dataset_baselines(split, get_task("vqa"), DataArgs())["unavailable"]
    (tmp_path / "train.json").write_text(json.dumps([{**row, "qid": q, "answer": a}
                                                     for q, a in ((2, "yes"), (3, "yes"), (4, "no"))]))
    baselines = dataset_baselines(split, get_task("vqa"), DataArgs())
    assert baselines["fitted_on"] == "slake train split, 3 records"
    assert [r["name"] for r in baselines["rows"]] == ["majority answer", "majority per answer type", "question-only"]
    assert baselines["rows"][2]["scores"]["accuracy"] == 100.0
