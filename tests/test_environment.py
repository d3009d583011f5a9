"""The start-up version check, the lock, and `scaling env`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from scaling.environment import LOCK_FILE, canonical, lock_lines, read_lock, version_problem, version_problems

ROOT = Path(__file__).resolve().parents[1]
SCALING = Path(sys.executable).with_name("scaling")


def fake_installed(tmp_path: Path, name: str, version: str) -> dict:
    """An environment in which `name` reports `version`: a dist-info that shadows the real one on sys.path. The check
    is on in it, also under `make test-latest`, which runs the suite with the skip variable set."""
    info = tmp_path / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    env = {key: value for key, value in os.environ.items() if key != "SCALING_SKIP_VERSION_CHECK"}
    return {**env, "PYTHONPATH": str(tmp_path)}


@pytest.mark.parametrize("command", [
    [str(SCALING), "estimate-memory", "--preset", "test"],
    [sys.executable, "recipes/finetune.py", "train.max_steps=1"],
])
def test_unsupported_transformers_is_one_line_with_range_and_fix(tmp_path, command):
    env = fake_installed(tmp_path, "transformers", "5.99.0")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "transformers 5.99.0 is installed" in lines[0]
    assert "supports transformers>=5.24,<5.25" in lines[0]
    assert "pip install 'transformers" in lines[0] and "SCALING_SKIP_VERSION_CHECK=1" in lines[0]


def test_skip_variable_runs_anyway(tmp_path):
    env = {**fake_installed(tmp_path, "transformers", "5.99.0"), "SCALING_SKIP_VERSION_CHECK": "1"}
    done = subprocess.run([str(SCALING), "estimate-memory", "--preset", "test", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert '"fits"' in done.stdout


def test_missing_and_unparsable_versions_are_named():
    requirement = Requirement("peft>=0.17,<0.22")
    assert "peft is not installed" in version_problem(requirement, None)
    assert "peft 0.23.0 is installed" in version_problem(requirement, "0.23.0")
    assert "peft banana is installed" in version_problem(requirement, "banana")
    assert version_problem(requirement, "0.21.2") is None
    assert version_problem(Requirement("torch>=2.4"), "2.13.0+cpu") is None  # local build labels are fine


def test_this_environment_is_supported():
    assert version_problems() == []


def pyproject_requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [line for extra in project["optional-dependencies"].values() for line in extra]
    return [Requirement(line) for line in lines]


def test_lock_pins_every_dependency_within_its_supported_range():
    pins = read_lock()
    for requirement in pyproject_requirements():
        name = canonical(requirement.name)
        assert name in pins, f"{LOCK_FILE} does not pin {requirement.name}; run `make lock`"
        pinned = Version(pins[name])
        assert requirement.specifier.contains(pinned, prereleases=True), (
            f"{LOCK_FILE} pins {name}=={pinned} outside pyproject's {requirement}; widen the range or re-lock")


def test_lock_mismatches_are_marked(tmp_path):
    lock = tmp_path / "cpu.lock"
    lock.write_text("# comment\ntransformers==1.0.0\nnot-a-real-package==2.0\n")
    lines = lock_lines(lock)
    assert "2 differ" in lines[0]
    assert any("transformers: locked 1.0.0 != installed 5." in line for line in lines)
    assert any("not-a-real-package: locked 2.0 != installed missing" in line for line in lines)


def test_env_report_names_the_stack_the_lock_and_accelerate():
    done = subprocess.run([str(SCALING), "env"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for expected in ("Python: 3.", "torch: 2.", "(CPU build)" if "+cpu" in done.stdout else "torch: ", "AVX512-BF16",
                     "transformers: 5.", "accelerate: ", "deepspeed: ", "deepspeed ops buildable here: ", "peft: ",
                     "bitsandbytes: ", "datasets: ", "supported versions: all requirements met", "lock: ",
                     "accelerate config: "):
        assert expected in done.stdout, expected


def test_env_runs_when_the_versions_are_wrong(tmp_path):
    env = fake_installed(tmp_path, "peft", "0.1.0")
    done = subprocess.run([str(SCALING), "env"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "UNSUPPORTED: peft 0.1.0 is installed" in done.stdout
    assert "peft: locked " in done.stdout and "!= installed 0.1.0" in done.stdout
