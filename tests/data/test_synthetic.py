"""The embedded synthetic dataset: deterministic bytes, caching, all six tasks through the real loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scaling.data import synthetic
from scaling.data.sources import load_source
from scaling.data.synthetic import SPEC_FILE, Scene, generate_synthetic, lesion_centers, questions, render
from scaling.data.tasks import TASKS

N_IMAGES = 40


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> synthetic.SyntheticData:
    return generate_synthetic(tmp_path_factory.mktemp("synthetic"), n_images=N_IMAGES, seed=3, image_size=64)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(generated, tmp_path):
    again = generate_synthetic(tmp_path / "again", n_images=N_IMAGES, seed=3, image_size=64)
    assert file_bytes(generated.root) == file_bytes(again.root)
    other = generate_synthetic(tmp_path / "other", n_images=N_IMAGES, seed=4, image_size=64)
    assert file_bytes(other.root)["slake/train.json"] != file_bytes(generated.root)["slake/train.json"]


def test_matching_spec_is_reused_and_a_changed_spec_regenerates(tmp_path):
    first = generate_synthetic(tmp_path, n_images=12, seed=0, image_size=32)
    spec_file = first.root / SPEC_FILE
    stamp = spec_file.stat().st_mtime_ns
    generate_synthetic(tmp_path, n_images=12, seed=0, image_size=32)
    assert spec_file.stat().st_mtime_ns == stamp
    generate_synthetic(tmp_path, n_images=14, seed=0, image_size=32)
    assert json.loads(spec_file.read_text())["n_images"] == 14
    assert len(list((tmp_path / "slake" / "imgs").iterdir())) == 14
    (tmp_path / "slake" / "imgs" / "synth_00000.png").unlink()  # incomplete data is regenerated, not reused
    generate_synthetic(tmp_path, n_images=14, seed=0, image_size=32)
    assert (tmp_path / "slake" / "imgs" / "synth_00000.png").is_file()


def test_every_task_is_read_back_by_its_real_loader(generated):
    assert set(generated.sources) == set(TASKS)
    for task, source in generated.sources.items():
        for split in source.splits:
            result = load_source(source.loader, source.path, split, on_bad_record="error", verify_images=True,
                                 **source.options)
            assert result.records, (task, split)
            assert {r.task for r in result.records} == {task}
            assert not result.skipped


def test_splits_hold_out_whole_images(generated):
    def images(split):
        return {r.image.path.name for r in load_source("slake", generated.sources["vqa"].path, split).records}

    train, validation, test = images("train"), images("validation"), images("test")
    assert len(test) == round(N_IMAGES * 0.2) and len(validation) == round(N_IMAGES * 0.05)
    assert not (train & test) and not (train & validation) and not (validation & test)
    captions = {r.image.path.name for r in load_source("caption_tsv", **_args(generated, "caption", "test")).records}
    assert captions == test


def _args(data, task, split):
    source = data.sources[task]
    return {"path": source.path, "split": split, **source.options}


def test_questions_cover_open_and_closed_and_do_not_reveal_the_open_answer():
    rng = np.random.default_rng(0)
    scenes = [synthetic.sample_scene(rng) for _ in range(200)]
    items = [qa for scene in scenes for qa in questions(scene, rng)]
    assert {qa.answer_type for qa in items} == {"OPEN", "CLOSED"}
    assert {qa.content_type for qa in items} == {"Abnormal", "Modality", "Plane", "Organ", "Position", "Size",
                                                   "Quantity"}
    answers_per_open_question = {}
    for qa in items:
        if qa.answer_type == "OPEN":
            answers_per_open_question.setdefault(qa.question, set()).add(qa.answer)
    # the wording of an open question never depends on its answer
    assert all(len(answers) > 1 for answers in answers_per_open_question.values())
    yes = sum(qa.answer == "yes" for qa in items)
    no = sum(qa.answer == "no" for qa in items)
    assert 0.4 < yes / (yes + no) < 0.7


@pytest.mark.parametrize("seed", range(5))
def test_yes_no_questions_naming_a_value_come_as_a_true_and_a_false_pair(seed):
    rng = np.random.default_rng(seed)
    scene = Scene("mri", "coronal", "brain", 2, "small", "upper")
    items = questions(scene, rng)
    for kind, truth in [("Modality", "MRI"), ("Plane", "coronal"), ("Organ", "brain"), ("Position", "upper"),
                        ("Size", "small")]:
        pair = [qa for qa in items if qa.content_type == kind and qa.answer in ("yes", "no")]
        assert sorted(qa.answer for qa in pair) == ["no", "yes"], kind
        assert [truth in qa.question for qa in pair] == [qa.answer == "yes" for qa in pair], kind


def test_answers_can_be_read_off_the_pixels():
    """Lesions are where the scene says: the rim/core contrast shows at each lesion centre, not elsewhere."""
    size = 96
    scene = Scene("ct", "axial", "abdomen", 2, "large", "left")
    pixels = render(scene, size, np.random.default_rng(1)).astype(float)
    normal = render(Scene("ct", "axial", "abdomen", 0, None, None), size, np.random.default_rng(1)).astype(float)
    for cx, cy in lesion_centers(scene, np.random.default_rng(0)):
        assert cx > 0.2  # patient's left is the image's right
        col, row = int((cx + 1) / 2 * size), int((cy + 1) / 2 * size)
        assert pixels[row, col] > normal[row, col] + 60
