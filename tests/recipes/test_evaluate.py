"""recipes/evaluate.py end to end on the synthetic data with a random `test`-preset checkpoint, one and two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CORPUS = ["is there a lesion in the left lung?", "what modality is this image?", "ct mri x-ray ultrasound",
          "axial coronal sagittal plane", "the brain chest abdomen", "small medium large lesions", "yes no maybe",
          "normal abnormal", "what does the image describe?", "what is the summary of article"] * 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-weight `test` model with a small trained BPE, saved like `scaling export` does."""
    from scaling.models.biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
    from scaling.models.biomedgpt.tokenization import save_tokenizer, train_bpe_tokenizer

    directory = tmp_path_factory.mktemp("ckpt") / "tiny-random"
    tokenizer = train_bpe_tokenizer(CORPUS, vocab_size=300, num_codes=0, num_bins=0)
    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(BiomedGPTConfig.from_preset("test", vocab_size=len(tokenizer)))
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The synthetic data the recipe generates by default (same size and seed), made once for all tests."""
    from scaling.data.synthetic import generate_synthetic

    directory = tmp_path_factory.mktemp("cache")
    generate_synthetic(directory / "synthetic", n_images=12, seed=42)
    return directory


def _evaluate(checkpoint, cache, work: Path, out: str, processes: int, *extra: str, launch: str = "cpu") -> Path:
    overrides = [f"eval.checkpoints=[{checkpoint}]", f"eval.output_dir={work / out}", f"train.output_dir={work / 'run'}",
                 f"data.cache_dir={cache}", "data.synthetic_images=12", "train.seed=42", "eval.max_samples=5",
                 "eval.batch_size=2", "logging.progress=false",
                 "train.mixed_precision='no'",  # float32: sharded and single-process predictions must be equal
                 "data.prompt_type=none", *extra]  # the test preset's 130 decoder positions: no room for the prompt
    script = str(ROOT / "recipes" / "evaluate.py")
    if processes == 1:
        command = [sys.executable, script, *overrides]
    else:
        command = [str(BIN / "accelerate"), "launch", "--config_file",
                   str(ROOT / "accelerate_configs" / f"{launch}.yaml"), "--num_processes", str(processes),
                   "--main_process_port", "29531", script, *overrides]
    # a crash in a rank (a rare abort at exit was seen once) leaves every thread's Python stack in stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return work / out


def _predictions(out: Path) -> dict[str, list]:
    return {p.name: [json.loads(line)["prediction"] for line in p.read_text().splitlines()]
            for p in sorted((out / "predictions").glob("*.jsonl"))}


def _scores(out: Path) -> list:
    report = json.loads((out / "report.json").read_text())
    return [(e["dataset"]["name"], e["mode"], e["metrics"]["scores"]) for e in report["evaluations"]]


@pytest.fixture(scope="module")
def single(checkpoint, cache, tmp_path_factory):
    """One process on the default evaluation data: the held-out synthetic split of all six tasks."""
    return _evaluate(checkpoint, cache, tmp_path_factory.mktemp("single"), "one", 1)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_match_one_process(checkpoint, cache, single, tmp_path):
    double = _evaluate(checkpoint, cache, tmp_path, "two", 2)
    assert _predictions(single) == _predictions(double)
    assert _scores(single) == _scores(double)
    modes = {name: mode for name, mode, _ in _scores(single)}
    assert modes == {"synthetic/vqa": "constrained", "synthetic/caption": "generate", "synthetic/classify": "score",
                     "synthetic/nli": "score", "synthetic/summarize": "generate", "synthetic/qa": "score"}
    for name in ("report.json", "report.md", "report.html"):
        assert (double / name).is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_sharded_weights_match_one_process(checkpoint, cache, single, tmp_path):
    """Weights sharded by ZeRO-3 over two ranks: constrained and free generation (synced, ranks stop at different
    lengths) and scoring give the one-process predictions, without hanging."""
    sharded = _evaluate(checkpoint, cache, tmp_path, "zero3", 2, launch="zero3")
    assert _predictions(single) == _predictions(sharded)
    assert _scores(single) == _scores(sharded)
    report = json.loads((sharded / "report.json").read_text())
    assert report["runs"][0]["environment"]["distributed_type"] == "DEEPSPEED"


@pytest.fixture(scope="module")
def adapter(checkpoint, tmp_path_factory):
    """A decoder LoRA on the checkpoint, with non-zero B so that it changes the model."""
    from scaling.adapters import apply_peft, save_adapter
    from scaling.config import PeftArgs
    from scaling.evaluation.checkpoints import load_for_eval

    model, _, _ = load_for_eval(checkpoint)
    model = apply_peft(model, PeftArgs(vision="freeze", encoder="freeze", decoder="lora"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    directory = tmp_path_factory.mktemp("peft") / "lora" / "adapter"
    save_adapter(model, directory)
    return directory


@pytest.mark.slow
def test_two_checkpoints_in_score_mode_and_report_merge(checkpoint, adapter, cache, tmp_path):
    """A base and a PEFT adapter on it side by side, every VQA candidate scored; `scaling report` merges reports."""
    from scaling.cli import main as cli
    from scaling.data.sources import load_source

    out = _evaluate(checkpoint, cache, tmp_path, "score", 1, "eval.mode=score",
                    f"eval.checkpoints=[{checkpoint}, {adapter}]", f"eval.base_checkpoint={checkpoint}",
                    f"data.eval_sources=[{{name: slake, path: {cache / 'synthetic' / 'slake'}, split: test}}]")
    report = json.loads((out / "report.json").read_text())
    base, adapted = report["evaluations"]
    assert [base["checkpoint"]["name"], adapted["checkpoint"]["name"]] == ["tiny-random", "tiny-random+lora"]
    assert base["checkpoint"]["fingerprint"] != adapted["checkpoint"]["fingerprint"]
    assert adapted["checkpoint"]["parameters"] > base["checkpoint"]["parameters"]
    records = {r.id: r for r in load_source("slake", cache / "synthetic" / "slake", "test").records}
    for evaluation in (base, adapted):
        assert evaluation["mode"] == "score" and evaluation["dataset"]["name"] == "slake/test"
        rows = [json.loads(line) for line in (out / evaluation["predictions_file"]).read_text().splitlines()]
        assert len(rows) == evaluation["dataset"]["n"] == 5
        assert all(row["prediction"] in records[row["id"]].candidates for row in rows)
        assert {"accuracy", "closed_accuracy"} <= set(evaluation["metrics"]["scores"])
    assert "| dataset (mode) | task | metric | tiny-random | tiny-random+lora | best baseline |" in (
        out / "report.md").read_text()
    assert base["baselines"]["fitted_on"].startswith("slake train split")  # the evaluated source's train split
    assert base["candidates"]["origin"] == "answers of the train+validation splits"

    assert cli(["report", str(out), str(out / "report.json"), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "report.json").read_text())
    assert len(merged["evaluations"]) == 4 and len(merged["runs"]) == 2


def test_missing_checkpoints_are_all_named_before_any_work(checkpoint, tmp_path):
    import importlib.util

    from scaling.config import ConfigError

    spec = importlib.util.spec_from_file_location("evaluate_recipe", ROOT / "recipes" / "evaluate.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    with pytest.raises(ConfigError) as error:
        recipe.main([f"eval.checkpoints=[{tmp_path / 'a'}, {checkpoint}, {tmp_path / 'b'}]",
                     f"train.output_dir={tmp_path / 'run'}"])
    assert len(error.value.problems) == 2 and "not a checkpoint" in str(error.value)
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.slow
def test_infer_with_defaults_answers_what_evaluate_answers(tmp_path, capsys):
    """A fresh export of a fine-tuning run (prompt in the decoder, shorter lengths than the defaults) carries its
    inference settings: evaluate follows them over a config that says otherwise, and `scaling infer` with no
    decoding or prompt flags gives evaluate's answer for every record."""
    from scaling.cli import main as cli
    from scaling.data.sources import load_source

    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    config = ROOT / "recipes" / "configs" / "biomedgpt" / "test_finetune.yaml"
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "finetune.py"), "--config", str(config),
                           f"train.output_dir={run_dir}", f"data.cache_dir={cache}", "train.max_steps=6",
                           "train.save_every=100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    settings = json.loads((run_dir / "export" / "inference.json").read_text())
    assert (settings["prompt_type"], settings["max_src_len"], settings["max_tgt_len"]) == ("prev_output", 48, 24)

    slake = cache / "synthetic" / "slake"  # _evaluate configures data.prompt_type=none: the export overrides it
    out = _evaluate(run_dir / "export", cache, tmp_path, "eval", 1, "eval.max_samples=6",
                    f"data.eval_sources=[{{name: slake, path: {slake}, split: test}}]")
    [evaluation] = json.loads((out / "report.json").read_text())["evaluations"]
    assert (evaluation["prompt_type"], evaluation["mode"]) == ("prev_output", "constrained")
    rows = [json.loads(line) for line in (out / evaluation["predictions_file"]).read_text().splitlines()]
    records = {r.id: r for r in load_source("slake", slake, "test").records}

    def infer(record, *flags):
        assert "," not in "".join(record.candidates)  # the list travels comma-separated
        assert cli(["infer", "--checkpoint", str(run_dir / "export"), "--image", str(record.image.path),
                    "--question", record.text["question"], "--candidates", ",".join(record.candidates), *flags]) == 0
        return capsys.readouterr().out.strip()

    assert len(rows) == 6
    assert [infer(records[row["id"]]) for row in rows] == [row["prediction"] for row in rows]
    # the layout reaches the model: the former default (no prompt in the decoder) scores every answer otherwise
    trained, former = (json.loads(infer(records[rows[0]["id"]], "--mode", "score", "--json", *flags))
                       for flags in ((), ("--prompt-type", "none")))
    assert trained["settings"]["prompt_type"] == "prev_output" and former["settings"]["prompt_type"] == "none"
    assert max(abs(trained["scores"][a] - former["scores"][a]) for a in trained["scores"]) > 1e-3
