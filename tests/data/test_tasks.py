import pytest

from scaling.data.records import BadRecord, ImageRef, Record
from scaling.data.tasks import TASKS, get_task

IMAGE = ImageRef(data=b"img")


def make(task: str, text: dict, target: str = "yes", image=IMAGE, candidates=None) -> Record:
    return Record(id="1", task=task, image=image, text=text, target=target, candidates=candidates)


def test_registry_has_the_six_task_types():
    assert set(TASKS) == {"vqa", "caption", "classify", "nli", "summarize", "qa"}


def test_vqa_prompt_is_the_normalised_question():
    rec = make("vqa", {"question": "Is the left-lung / right  lung Normal", "object": "CHEST"}, target=" Yes ")
    assert TASKS["vqa"].prompt(rec) == " is the left lung right lung normal?"
    assert TASKS["vqa"].prompt(make("vqa", {"question": "Where?"})) == " where?"
    assert get_task("vqa", add_object=True).prompt(rec) == " is the left lung right lung normal? object: chest"
    assert TASKS["vqa"].target(rec) == " yes"


def test_caption_and_classify_prompt():
    assert TASKS["caption"].prompt(make("caption", {})) == " what does the image describe?"
    assert TASKS["classify"].prompt(make("classify", {})) == " what does the image describe?"
    caption = make("caption", {}, target="No acute cardiopulmonary abnormality. Heart size, normal!")
    assert TASKS["caption"].target(caption) == " no acute cardiopulmonary abnormality heart size normal"


def test_nli_prompt_lowercases_both_sentences():
    rec = make("nli", {"sentence1": "Patient has FEVER.", "sentence2": "Patient is Afebrile."}, image=None)
    assert TASKS["nli"].prompt(rec) == ' can text1 " patient has fever. " imply text2 " patient is afebrile. "?'
    assert TASKS["nli"].target(rec) == " yes"
    assert TASKS["nli"].candidates(rec) == ["yes", "no", "maybe"]


def test_summarize_prompt():
    rec = make("summarize", {"source": "What are the  side effects of Aspirin?"}, target="Aspirin side effects?")
    assert TASKS["summarize"].prompt(rec) == ' what is the summary of article " What are the side effects of Aspirin? "?'
    assert TASKS["summarize"].target(rec) == " Aspirin side effects?"
    assert TASKS["summarize"].candidates(rec) is None


def test_qa_prompt_puts_the_question_before_the_context():
    rec = make("qa", {"question": "Does X cause Y?", "context": "We studied X. Y rose."}, target="maybe")
    assert TASKS["qa"].prompt(rec) == ' what is the answer to question " does x cause y? " given context " we studied x. y rose. "?'
    assert TASKS["qa"].candidates(rec) == ["yes", "no", "maybe"]


def test_classify_and_vqa_candidates_come_from_the_record():
    rec = make("classify", {}, target="adipose", candidates=["adipose", "debris"])
    assert TASKS["classify"].candidates(rec) == ["adipose", "debris"]


def test_decoding_defaults_follow_the_biomedgpt_scripts():
    assert TASKS["caption"].decoding.beam == 10 and TASKS["caption"].decoding.no_repeat_ngram_size == 3
    assert TASKS["summarize"].decoding.length_penalty == 0.7 and TASKS["summarize"].decoding.max_new_tokens == 128
    assert TASKS["vqa"].decoding.mode == "constrained" and TASKS["vqa"].decoding.beam == 1
    assert TASKS["classify"].decoding.mode == "score"
    assert all(task.metrics for task in TASKS.values())


def test_check_rejects_what_a_task_needs():
    with pytest.raises(BadRecord, match="missing image"):
        TASKS["vqa"].check(make("vqa", {"question": "q"}, image=None))
    with pytest.raises(BadRecord, match="empty question"):
        TASKS["vqa"].check(make("vqa", {"question": " "}))
    with pytest.raises(BadRecord, match="missing answer"):
        TASKS["vqa"].check(make("vqa", {"question": "q"}, target=" "))
    TASKS["vqa"].check(make("vqa", {"question": "q"}))


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(KeyError, match="vqa, caption"):
        get_task("detect")
