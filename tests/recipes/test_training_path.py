"""The one training path as users run it: the end-of-training evaluation a config promises, `train.compile=true`
(heavy: inductor takes minutes), and user mistakes that stop every recipe with one message and exit code 2 before any
work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from recipe_runs import ROOT, logged_steps, losses, max_abs_diff, recipe_args, run, says, weights

pytestmark = pytest.mark.slow
VQA_RAD = ROOT.parent / "shared" / "data" / "vqa_rad"
PYTHON = [sys.executable]


@pytest.mark.skipif(not VQA_RAD.is_dir(), reason="needs ../shared/data/vqa_rad (the VQA-RAD release)")
def test_finetune_evaluates_the_named_eval_sources_after_training(tmp_path):
    done = run(PYTHON + recipe_args(tmp_path, tmp_path / "cache", "eval.after_training=true",
                                    f"data.eval_sources=[{{name: vqa_rad, path: {VQA_RAD}, split: test}}]"))
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    [evaluation] = report["evaluations"]
    assert evaluation["dataset"]["name"] == "vqa_rad/test" and evaluation["dataset"]["n"] == 8  # eval.max_samples
    assert evaluation["dataset"]["available"] == 451  # VQA-RAD's official test split
    assert {"accuracy", "closed_accuracy", "open_accuracy"} <= set(evaluation["metrics"]["scores"])
    assert (tmp_path / "eval" / "report.html").is_file()
    assert "vqa_rad/test/accuracy" in done.stdout + done.stderr


@pytest.mark.heavy  # inductor compiles the test model for about 5 minutes on a 2-core CPU
def test_train_compile_trains_the_eager_runs_model_and_exports_plain_weights(tmp_path):
    run(PYTHON + recipe_args(tmp_path / "eager", tmp_path / "cache"))
    kernels = tmp_path / "inductor"  # where inductor writes the kernels it generates: proof that it compiled
    done = run(PYTHON + recipe_args(tmp_path / "compiled", tmp_path / "cache", "train.compile=true"),
               env={"TORCHINDUCTOR_CACHE_DIR": str(kernels)}, timeout=1800)
    assert says(done.stdout + done.stderr, "torch.compile (inductor): the first step compiles the model")
    assert any(kernels.rglob("*.py")), "inductor generated no kernels"
    assert logged_steps(tmp_path / "compiled") == list(range(1, 9))
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-3)
    from scaling.models.biomedgpt import BiomedGPTForConditionalGeneration

    exported = BiomedGPTForConditionalGeneration.from_pretrained(tmp_path / "compiled" / "export").state_dict()
    trained = weights(tmp_path / "compiled", 8)  # the compiled wrapper's `_orig_mod.` must not reach either
    assert max_abs_diff({k: exported[k] for k in trained}, trained) == 0.0


MISTAKES = {
    "unknown key": ("train.max_stepz=3", "unknown key"),
    "bad value": ("train.max_steps=0", "train.max_steps must be >= 1"),
    "missing dataset": ("data.sources=[{name: vqa_rad, path: /nonexistent/vqa_rad, split: train}]",
                        "/nonexistent/vqa_rad"),
}


@pytest.mark.parametrize("recipe", ["finetune.py", "instruct.py", "evaluate.py", "peft_sweep.py"])
@pytest.mark.parametrize("mistake", MISTAKES, ids=str)
def test_user_mistakes_are_one_message_and_exit_code_2(tmp_path, recipe, mistake):
    override, message = MISTAKES[mistake]
    if recipe == "evaluate.py" and mistake == "missing dataset":
        override = override.replace("data.sources", "data.eval_sources").replace("train}", "test}")
    done = run(PYTHON + recipe_args(tmp_path / "run", tmp_path / "cache", override, recipe=recipe, config=None),
               expect=2)
    assert message in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_recipes_import_only_the_library():
    for recipe in (ROOT / "recipes").glob("*.py"):
        text = recipe.read_text()
        assert "sys.path" not in text and "importlib" not in text, recipe.name
        imports = [line for line in text.splitlines() if line.startswith(("import ", "from "))]
        assert not any(Path(name).stem in " ".join(imports).split() for name in ("finetune", "instruct")), recipe.name
