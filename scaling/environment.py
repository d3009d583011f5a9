"""The installed stack against what this package supports: a start-up check, and `scaling env` for bug reports.

The supported ranges are the package's own requirements (pyproject.toml, read back from the installed metadata), so
they live in one place; the exact versions the test suite passed with are in requirements/cpu.lock.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

SKIP_CHECK_VARIABLE = "SCALING_SKIP_VERSION_CHECK"
LOCK_FILE = Path(__file__).resolve().parents[1] / "requirements" / "cpu.lock"
REPORTED = ("torch", "transformers", "accelerate", "deepspeed", "peft", "bitsandbytes", "datasets", "tokenizers")


def supported_requirements() -> list[Requirement]:
    """This package's runtime requirements (extras left out), as installed."""
    try:
        declared = metadata.requires("scaling") or []
    except metadata.PackageNotFoundError:  # a source tree on sys.path without `pip install -e .`: nothing to check
        return []
    requirements = [Requirement(line) for line in declared]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def installed_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_problem(requirement: Requirement, found: str | None) -> str | None:
    """One line naming the package, the version found, the supported range and the fix; None when it is fine."""
    wanted = requirement.name + ",".join(str(s) for s in sorted(requirement.specifier, key=upper_bound_last))
    if found is None:
        return f"{requirement.name} is not installed; scaling needs {wanted}. Fix: pip install '{wanted}'"
    try:
        fine = requirement.specifier.contains(Version(found), prereleases=True)
    except InvalidVersion:
        fine = False
    if fine:
        return None
    return (f"{requirement.name} {found} is installed, but scaling supports {wanted}. Fix: pip install '{wanted}' "
            f"(or `make setup` for the tested lock)")


def upper_bound_last(specifier) -> bool:
    """Sort key that prints `>=5.24,<5.25` rather than packaging's `<5.25,>=5.24`."""
    return specifier.operator.startswith("<")


def version_problems(installed: Callable[[str], str | None] = installed_version) -> list[str]:
    """A line per requirement that the installed stack does not meet."""
    problems = (version_problem(r, installed(r.name)) for r in supported_requirements())
    return [p for p in problems if p]


def require_supported_versions() -> None:
    """Stop with one line per unsupported package (exit code 2) unless SCALING_SKIP_VERSION_CHECK is set."""
    if os.environ.get(SKIP_CHECK_VARIABLE, "") not in ("", "0"):
        return
    problems = version_problems()
    if problems:
        for line in problems:
            print(f"scaling: {line}. Set {SKIP_CHECK_VARIABLE}=1 to run anyway.", file=sys.stderr)
        raise SystemExit(2)


# ----------------------------------------------------------------------------------------------------------------
# `scaling env`
# ----------------------------------------------------------------------------------------------------------------


def read_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    """name -> version of a `name==version` lock file (comments and blank lines skipped)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def canonical(name: str) -> str:
    """PEP 503 name, so `PyYAML` and `pyyaml` compare equal."""
    return name.lower().replace("_", "-").replace(".", "-")


def torch_lines() -> list[str]:
    """torch's build, the device it would train on, and the CPU's bf16 support."""
    import torch

    lines = [f"torch: {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU'} build)"]
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        lines.append(f"GPUs: {torch.cuda.device_count()} x {', '.join(names)}; bf16: {torch.cuda.is_bf16_supported()}")
    else:
        lines.append("GPUs: none")
    lines.append(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, vector ISA "
                 f"{torch.backends.cpu.get_cpu_capability()}, AMX {torch.cpu._is_amx_tile_supported()}, "
                 f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}, intra-op threads {torch.get_num_threads()}")
    return lines


def deepspeed_ops_line() -> str:
    """DeepSpeed's ops for this accelerator: which are prebuilt and which can be JIT-built (as `ds_report` lists)."""
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
    except Exception as error:  # a broken deepspeed install is what this report is for
        return f"deepspeed ops: unavailable ({type(error).__name__}: {error})"
    states = []
    for name, builder in sorted(ALL_OPS.items()):
        if installed_ops.get(name):
            states.append(f"{name} (prebuilt)")
        elif builder.is_compatible(False):
            states.append(name)
    return f"deepspeed ops buildable here: {', '.join(states) or 'none'}"


def accelerate_config_lines() -> list[str]:
    """The accelerate default config (what a bare `accelerate launch` uses) and any ACCELERATE_* settings in force."""
    from accelerate.commands.config import default_config_file

    path = Path(os.environ.get("ACCELERATE_CONFIG_FILE", default_config_file))
    lines = [f"accelerate config: {path if path.exists() else 'none (accelerate defaults)'}"]
    if path.exists():
        lines += [f"    {line}" for line in path.read_text().splitlines() if line.strip()]
    lines += [f"{key}={value}" for key, value in sorted(os.environ.items()) if key.startswith("ACCELERATE_")]
    return lines


def lock_lines(lock: Path = LOCK_FILE) -> list[str]:
    """Every locked package beside the installed version; mismatches marked with `!=`."""
    if not lock.exists():
        return [f"lock: {lock} not found (not a source checkout)"]
    pins = read_lock(lock)
    rows = [(name, pinned, installed_version(name)) for name, pinned in sorted(pins.items())]
    off = [(n, p, i) for n, p, i in rows if i is None or Version(i).public != Version(p).public]
    lines = [f"lock: {lock} ({len(rows)} pins, {len(off)} differ from what is installed)"]
    lines += [f"    {name}: locked {pinned} != installed {found or 'missing'}" for name, pinned, found in off]
    return lines


def environment_report() -> str:
    """What to paste into a bug report."""
    lines = [f"scaling: {installed_version('scaling') or 'not installed (source tree)'}",
             f"Python: {sys.version.split()[0]} on {platform.platform()}"]
    lines += torch_lines()
    lines += [f"{name}: {installed_version(name) or 'not installed'}" for name in REPORTED[1:]]
    lines.append(deepspeed_ops_line())
    problems = version_problems()
    lines += [f"UNSUPPORTED: {p}" for p in problems] or ["supported versions: all requirements met"]
    lines += lock_lines()
    lines += accelerate_config_lines()
    return "\n".join(lines)
