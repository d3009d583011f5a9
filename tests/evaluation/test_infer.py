"""`scaling infer` on a random `test` checkpoint: image questions, text-only tasks, PEFT adapters, clear errors."""

import json

import pytest
import torch
from PIL import Image

from scaling.cli import main as cli
from scaling.config import PeftArgs
from scaling.evaluation.checkpoints import load_for_eval
from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from scaling.models.biomedgpt.tokenization import save_tokenizer, train_bpe_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("infer") / "model"
    tokenizer = train_bpe_tokenizer(["is there a lesion? yes no maybe ct mri brain"] * 20, vocab_size=300,
                                    num_codes=0, num_bins=0)
    torch.manual_seed(0)
    BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_preset("test", vocab_size=len(tokenizer))) \
        .save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory


@pytest.fixture
def scan(tmp_path):
    path = tmp_path / "scan.png"
    Image.new("RGB", (48, 40), (90, 120, 30)).save(path)
    return path


def _run(capsys, *argv):
    assert cli(["infer", *map(str, argv)]) == 0
    return capsys.readouterr().out.strip()


def test_image_question_constrained_to_given_candidates(checkpoint, scan, capsys):
    answer = _run(capsys, "--checkpoint", checkpoint, "--image", scan, "--question", "is there a lesion?",
                  "--candidates", "yes,no,left lung")
    assert answer in {"yes", "no", "left lung"}


def test_text_task_scores_every_label(checkpoint, capsys):
    result = json.loads(_run(capsys, "--checkpoint", checkpoint, "--task", "nli", "--text1", "the patient has fever",
                             "--text2", "the patient is febrile", "--json"))
    assert result["mode"] == "score" and set(result["scores"]) == {"yes", "no", "maybe"}
    assert result["prediction"] == max(result["scores"], key=result["scores"].get)
    assert "can text1" in result["prompt"]


def test_adapter_on_its_base(checkpoint, scan, tmp_path, capsys):
    from scaling.adapters import apply_peft, save_adapter

    base, _, _ = load_for_eval(checkpoint)
    adapted = apply_peft(base, PeftArgs(vision="freeze", encoder="freeze", decoder="lora"))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a trained-looking adapter, so it changes the outputs
    save_adapter(adapted, tmp_path / "lora" / "adapter")
    model, _, info = load_for_eval(tmp_path / "lora" / "adapter", base=checkpoint)
    assert info["name"] == "model+lora" and info["base"] == str(checkpoint)
    assert any("lora_" in name for name, _ in model.named_parameters())
    answer = _run(capsys, "--checkpoint", tmp_path / "lora" / "adapter", "--base-checkpoint", checkpoint, "--image", scan,
                  "--question", "is there a lesion?", "--candidates", "yes,no")
    assert answer in {"yes", "no"}


def test_errors_name_the_problem(checkpoint, tmp_path, capsys):
    assert cli(["infer", "--checkpoint", str(tmp_path), "--task", "nli", "--text1", "a", "--text2", "b"]) == 1
    assert "not a checkpoint" in capsys.readouterr().err
    assert cli(["infer", "--checkpoint", str(checkpoint), "--task", "nli", "--text1", "a"]) == 1
    assert "sentence2" in capsys.readouterr().err
    assert cli(["infer", "--checkpoint", str(checkpoint), "--question", "what?"]) == 1
    assert "needs an image" in capsys.readouterr().err


def test_defaults_come_from_the_exports_inference_settings(checkpoint, scan, tmp_path, capsys):
    """Without inference.json: the toolkit's defaults (the prompt in the decoder); with one: what the run recorded,
    including an instruction template that presents the given candidates as options."""
    import shutil

    from scaling.config import load_config, save_config
    from scaling.evaluation.checkpoints import write_inference_settings

    question = ["--image", scan, "--question", "is there a lesion?", "--json"]
    plain = json.loads(_run(capsys, "--checkpoint", checkpoint, *question))
    assert plain["settings"]["recorded"] is False and plain["settings"]["prompt_type"] == "prev_output"
    assert plain["prompt"] == " is there a lesion?" and plain["mode"] == "generate"  # no candidates to constrain to

    run_dir = tmp_path / "run"
    save_config(load_config(None, ["data.instruction=true", "data.prompt_type=none", "data.max_src_len=40",
                                   "eval.mode=generate", "eval.max_new_tokens=3"]), run_dir)
    export = shutil.copytree(checkpoint, run_dir / "export")
    write_inference_settings(export, run_dir)
    tuned = json.loads(_run(capsys, "--checkpoint", export, *question, "--candidates", "yes,no"))
    assert tuned["settings"]["recorded"] is True and tuned["settings"]["max_src_len"] == 40
    assert tuned["settings"]["prompt_type"] == "none" and tuned["mode"] == "generate"
    assert tuned["prompt"] == " Question: is there a lesion? Options: (a) yes; (b) no The answer is:"
    assert tuned["settings"]["image_size"] == json.loads((checkpoint / "config.json").read_text())["image_size"]
    open_question = json.loads(_run(capsys, "--checkpoint", export, *question))
    assert open_question["prompt"] == ' Answer the following question about the image. "is there a lesion?"'
    flagged = json.loads(_run(capsys, "--checkpoint", export, *question, "--prompt-type", "prev_output"))
    assert flagged["settings"]["prompt_type"] == "prev_output"  # a flag still overrides the export
