"""The examples, run as a user runs them: through the launcher (2 gloo processes) or torchrun, a few steps each.

* the main job under FSDP2 writes metrics, plot, summary, weights and complete DCP checkpoints, and learns;
* stopping after 8 steps and resuming reproduces the uninterrupted 12-step run's metrics exactly (FSDP2, DDP, one
  process), and so does a run whose last worker dies at step 10 under ``--max-restarts 1`` (torchrun restarts the
  workers, which continue from the step-8 checkpoint by themselves);
* the image example and the recipes (when their packages are installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: A model small enough for seconds per run (d0 raised so that 12 steps visibly learn; eval and checkpoint every 4).
TINY = ["--config", "configs/lm_tiny.json"]
STEPS = 12
#: What must be identical between runs (the time-free part of every record).
COMPARED = ("step", "loss", "eval_loss", "d/0", "d/1", "dlr/0", "dlr/1", "effective_lr/0", "effective_lr/1")


def run(*argv: str, launcher: bool = True, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    prefix = [sys.executable, "-m", "launch"] if launcher else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "examples" / "train_lm.py")]
    done = subprocess.run([*prefix, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in COMPARED if k in r} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``engine -> run dir`` of the uninterrupted 12-step runs (each started once, on first use)."""
    runs: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in runs:
            out = tmp_path_factory.mktemp(f"full_{engine}")
            run("--engine", engine, "--steps", str(STEPS), "--out", str(out), *TINY)
            runs[engine] = out
        return runs[engine]

    return get


def test_main_job_fsdp2_writes_metrics_plot_checkpoints(uninterrupted):
    out = uninterrupted("fsdp2")
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert {"loss", "d/0", "d/1", "dlr/0", "effective_lr/0", "effective_lr/1"} <= set(r)
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8, 12]
    assert records[-1]["loss"] < records[0]["loss"] - 0.1  # it learns
    assert records[-1]["eval_loss"] < records[3]["eval_loss"]
    assert records[0]["d/0"] == pytest.approx(1e-4)
    assert records[-1]["d/0"] > 2e-4  # d grew from d0
    assert (out / "loss_d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["engine"] == "fsdp2"
    assert summary["final_loss"] == records[-1]["loss"] and summary["d/0"] == records[-1]["d/0"]
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step_000008", "step_000012"]  # every 4 steps, the newest two kept
    for name in steps:
        files = {p.name for p in (out / "checkpoints" / name).iterdir()}
        assert {".metadata", "rank0.pt", "rank1.pt"} <= files
    import torch

    weights = torch.load(out / "model.pt", weights_only=True)
    assert weights["tokens.weight"].shape == (128, 32)  # full (unsharded) tensors


@pytest.mark.parametrize("engine", ["fsdp2", "ddp", "single"])
def test_resume_reproduces_the_uninterrupted_run(uninterrupted, tmp_path, engine):
    reference = metrics(uninterrupted(engine))
    out = tmp_path / "run"
    first = run("--engine", engine, "--steps", "8", "--out", str(out), *TINY)
    assert "starting at step 0" in first.stdout
    resumed = run("--engine", engine, "--steps", str(STEPS), "--out", str(out), "--resume", *TINY)
    assert "resuming at step 8" in resumed.stdout
    assert comparable(metrics(out)) == comparable(reference)


def test_direct_torchrun_run_equals_the_launcher_run(uninterrupted, tmp_path):
    """``torchrun examples/train_lm.py`` without the launcher: the same job, the same numbers."""
    run("--engine", "fsdp2", "--steps", str(STEPS), "--out", str(tmp_path), *TINY, launcher=False)
    assert comparable(metrics(tmp_path)) == comparable(metrics(uninterrupted("fsdp2")))


def test_worker_failure_restarts_from_the_last_checkpoint(uninterrupted, tmp_path):
    done = run("--max-restarts", "1", "--engine", "fsdp2", "--steps", str(STEPS), "--out", str(tmp_path),
               "--fail-at-step", "10", *TINY)
    log = done.stdout + done.stderr
    assert "rank 1: --fail-at-step 10" in log
    assert "resuming at step 8" in log  # the restarted workers found the step-8 checkpoint by themselves
    records = metrics(tmp_path)
    reference = metrics(uninterrupted("fsdp2"))
    assert comparable(records) == comparable(reference)
    assert (records[-1]["loss"], records[-1]["d/0"]) == (reference[-1]["loss"], reference[-1]["d/0"])


def test_compare_adamw_trains_both_and_plots(tmp_path):
    run("--engine", "single", "--steps", "6", "--out", str(tmp_path), "--compare", "adamw", "warmup=2", *TINY)
    prodigy, adamw = metrics(tmp_path), metrics(tmp_path / "adamw")
    assert len(prodigy) == len(adamw) == 6
    assert "d/0" in prodigy[-1] and "lr/0" in adamw[-1]
    assert adamw[0]["lr/0"] == pytest.approx(1.5e-3) and adamw[1]["lr/0"] == pytest.approx(3e-3)  # warmup
    assert adamw[-1]["lr/0"] == pytest.approx(3e-4)  # cosine to 10% at the last step
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_image_classification_learns_digits(tmp_path):
    pytest.importorskip("sklearn")
    done = run("--config", "configs/image_digits.json", "--out", str(tmp_path), "epochs=2")
    lines = [line for line in done.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "test loss" in lines[0] and "accuracy" in lines[0]
    records = metrics(tmp_path)
    assert records[-1]["accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert records[-1]["test_loss"] < records[0]["test_loss"]
    assert records[-1]["d/0"] > 1e-6


def test_deepspeed_example_through_the_launcher():
    if not (ROOT / "examples" / "deepspeed_lm.py").is_file():
        pytest.skip("examples/deepspeed_lm.py is not there yet")
    pytest.importorskip("deepspeed")
    done = run("--engine", "deepspeed", "--steps", "3")
    assert "step 3" in done.stdout


@pytest.mark.parametrize("recipe, package", [("hf_trainer", "transformers"), ("lightning_module", "lightning")])
def test_recipe_runs_a_few_steps(tmp_path, recipe, package):
    pytest.importorskip(package)
    path = ROOT / "examples" / "recipes" / f"{recipe}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{recipe}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    logged = module.main(["--steps", "6", "--out", str(tmp_path)])
    assert len(logged) >= 3 and all(d > 0 for d in logged)
    assert logged[-1] > logged[0]  # d rose from d0
