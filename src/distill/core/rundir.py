"""What a run leaves behind: the result of a run and the run folder's files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    student: nn.Module | None = None
