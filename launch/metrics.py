"""The metrics of a run: one JSON object per line in ``RUN/metrics.jsonl``, and a PNG plot of loss and d.

Only rank 0 writes. A resumed run first drops the lines after the step it resumes from, so the file always reads as
one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends records to ``path`` (rank 0 only; a no-op elsewhere)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read(self.path) if r["step"] <= resume_step] if resume_step is not None else []
        with self.path.open("w") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")

    def append(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot(path: Path, runs: dict[str, list[dict[str, Any]]], title: str = "") -> Path:
    """Loss (train, and eval where recorded) and the step size against steps, one line per run and group.

    The right panel shows ``d`` per group for Prodigy runs and the learning rate for the others (keys ``d/i`` and
    ``lr/i``), on a log scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_d) = plt.subplots(1, 2, figsize=(11, 4))
    for label, records in runs.items():
        steps, loss = _series(records, "loss")
        line, = ax_loss.plot(steps, loss, lw=1, alpha=0.8, label=f"{label} train")
        steps, eval_loss = _series(records, "eval_loss")
        if steps:
            ax_loss.plot(steps, eval_loss, "o-", color=line.get_color(), ms=3, label=f"{label} eval")
        keys = sorted({k for r in records for k in r if k.startswith(("d/", "lr/"))})
        for key in keys:
            steps, values = _series(records, key)
            ax_d.plot(steps, values, "--" if key.startswith("lr/") else "-", label=f"{label} {key}")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_d.set_xlabel("step")
    ax_d.set_ylabel("d (Prodigy) / lr (others)")
    ax_d.set_yscale("log")
    ax_d.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
