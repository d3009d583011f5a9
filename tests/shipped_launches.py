"""The launch commands a shipped recipe config documents in its header, read the way a user would copy them.

    for launch in documented_launches(ROOT / "recipes/configs/biomedgpt/large_finetune.yaml"):
        launch.accelerate_config, launch.config_path, launch.runtime(cuda=True), launch.command(...)
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scaling.config import Runtime

ROOT = Path(__file__).resolve().parents[1]
RECIPE_CONFIGS = sorted((ROOT / "recipes" / "configs").rglob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
RECIPE_DEFAULT_CONFIGS = {"recipes/instruct.py": ROOT / "recipes" / "configs" / "biomedgpt" / "mini_instruct.yaml"}
"""The config a recipe reads when the command names none (finetune.py: scaling.config's defaults)."""
MULTI_PROCESS_TYPES = {"MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP"}


@dataclass
class Launch:
    """One documented command: `accelerate launch [flags] RECIPE ARGS` or `python RECIPE ARGS`."""

    launcher: str
    """accelerate or python."""
    flags: list[str]
    """accelerate launch's own flags, as written."""
    recipe: str
    args: list[str]
    """What follows the recipe: --config FILE and overrides."""
    flag_values: dict[str, str] = field(default_factory=dict)

    @property
    def config_path(self) -> Path | None:
        """The recipe config the command runs: its --config, or the recipe's default."""
        if self.args[:1] == ["--config"]:
            return ROOT / self.args[1]
        return RECIPE_DEFAULT_CONFIGS.get(self.recipe)

    @property
    def overrides(self) -> list[str]:
        return self.args[2:] if self.args[:1] == ["--config"] else self.args

    @property
    def accelerate_config(self) -> Path | None:
        name = self.flag_values.get("--config_file")
        return ROOT / name if name else None

    def accelerate_settings(self) -> dict:
        return yaml.safe_load(self.accelerate_config.read_text()) if self.accelerate_config else {}

    def deepspeed_settings(self) -> dict:
        """The DeepSpeed JSON the accelerate config points at ({} without DeepSpeed)."""
        ds = self.accelerate_settings().get("deepspeed_config", {})
        return json.loads((ROOT / ds["deepspeed_config_file"]).read_text()) if "deepspeed_config_file" in ds else {}

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed_settings().get("zero_optimization", {}).get("stage", 0))

    @property
    def offload(self) -> bool:
        zero = self.deepspeed_settings().get("zero_optimization", {})
        return any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))

    @property
    def multi_process(self) -> bool:
        return self.accelerate_settings().get("distributed_type") in MULTI_PROCESS_TYPES

    def runtime(self, cuda: bool, processes: int | None = None) -> Runtime:
        """What this launch gives the recipe's start-up validation."""
        return Runtime(cuda=cuda, zero_stage=self.zero_stage, offload=self.offload,
                       num_processes=processes or int(self.flag_values.get("--num_processes", 1)))

    def command(self, processes: int, port: int, extra_args: list[str]) -> list[str]:
        """The command as documented, on `processes` processes when it starts several, plus `extra_args`."""
        if self.launcher == "python":
            return [sys.executable, str(ROOT / self.recipe), *self.args, *extra_args]
        flags = list(self.flags)
        if self.multi_process:
            flags = _set_flag(flags, "--num_processes", str(processes))
            flags = _set_flag(flags, "--main_process_port", str(port))  # several test launches at once
        return [sys.executable, "-m", "accelerate.commands.launch", *flags, str(ROOT / self.recipe), *self.args,
                *extra_args]


def header(path: Path) -> list[str]:
    """The leading comment lines of a YAML file, without the '#'."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:])
    return lines


def documented_launches(path: Path) -> list[Launch]:
    """Every `accelerate launch` / `python recipes/...` command of a YAML's header (Slurm submissions excluded)."""
    commands, current = [], None
    for line in header(path):
        text = line.strip()
        if current is not None:
            current += " " + text.rstrip("\\")
        elif text.startswith(("accelerate launch ", "python recipes/")):
            current = text.rstrip("\\")
        else:
            continue
        if not text.endswith("\\"):
            commands.append(current)
            current = None
    return [_parse(shlex.split(command)) for command in commands]


def _parse(words: list[str]) -> Launch:
    launcher = "python" if words[0] == "python" else "accelerate"
    rest = words[1:] if launcher == "python" else words[2:]
    recipe_at = next(i for i, w in enumerate(rest) if w.endswith(".py"))
    flags = rest[:recipe_at]
    values = {flags[i]: flags[i + 1] for i in range(len(flags) - 1) if flags[i].startswith("--")
              and not flags[i + 1].startswith("--")}
    return Launch(launcher, flags, rest[recipe_at], rest[recipe_at + 1:], values)


def _set_flag(flags: list[str], name: str, value: str) -> list[str]:
    if name in flags:
        out = list(flags)
        out[out.index(name) + 1] = value
        return out
    return [*flags, name, value]
