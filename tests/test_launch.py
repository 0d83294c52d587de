"""The launcher: bad input stops in the launcher process with one line; defaults and torchrun pass-through.

Everything here runs in-process except one check of the real entry point (``python -m launch``); the training
runs themselves are in test_examples.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import cli
from launch.config import ConfigError, apply, parse_override

ROOT = Path(__file__).resolve().parent.parent


def launch_error(capsys, *argv: str) -> str:
    """Run the launcher on bad input; it must return 2 and print exactly one line, to stderr."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("prodigy-dist-launch: error: ")
    return lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["--engine", "nccl2"], "invalid choice: 'nccl2'"),
    (["--config", "configs/no_such.json"], "config file not found: 'configs/no_such.json'"),
    (["--steps", "many"], "invalid value for steps: 'many' (expected int)"),
    (["--steps", "0"], "invalid value for steps: 0 (expected > 0)"),
    (["--batch-size", "-3"], "invalid value for batch_size: -3"),
    (["learning_rate=3"], "unknown option 'learning_rate'"),
    (["d_model=abc"], "invalid value for d_model: 'abc'"),
    (["progress=maybe"], "invalid value for progress: 'maybe' (expected bool)"),
    (["d_model=100", "n_heads=3"], "100 is not a multiple of n_heads=3"),
    (["optimizer=sgd"], "invalid value for optimizer: 'sgd'"),
    (["nonsense"], "invalid override 'nonsense'"),
    (["--compare", "sgd"], "invalid choice: 'sgd'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--nproc-per-node", "many"], "invalid --nproc-per-node: 'many'"),
    (["--max-restarts", "x"], "invalid int value: 'x'"),
    (["--nproc-per-node"], "--nproc-per-node needs a value"),
    (["--engine", "single", "--nproc-per-node", "2"], "--engine single runs one plain process"),
    (["-m", "mymodule"], "-m is not supported here"),
    (["--script", "examples/no_such.py"], "example script not found"),
    (["--config", "configs/image_digits.json", "--steps", "5"], "unknown option 'steps' in the command line"),
])
def test_bad_input_is_one_line(capsys, argv, expected):
    assert expected in launch_error(capsys, *argv)


def test_config_for_another_example(tmp_path, capsys):
    config = tmp_path / "digits_for_lm.json"
    config.write_text(json.dumps({"example": "image_classification", "epochs": 2}))
    line = launch_error(capsys, "--script", str(ROOT / "examples" / "train_lm.py"), "--config", str(config))
    assert "is for example 'image_classification', not 'train_lm'" in line


def test_invalid_config_file(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{\"steps\": 3,")
    assert "invalid JSON" in launch_error(capsys, "--config", str(broken))
    wrong_type = tmp_path / "wrong.json"
    wrong_type.write_text(json.dumps({"steps": "ten"}))
    assert "invalid value for steps: 'ten'" in launch_error(capsys, "--config", str(wrong_type))


def test_deepspeed_engine(capsys):
    """The DeepSpeed example with a DeepSpeed JSON (default ZeRO-2); a clear line while it or DeepSpeed is missing."""
    import importlib.util

    if not cli.DEEPSPEED_EXAMPLE.is_file() or importlib.util.find_spec("deepspeed") is None:
        line = launch_error(capsys, "--engine", "deepspeed")
        assert "examples/deepspeed_lm.py" in line or "pip install -e '.[deepspeed]'" in line
        return
    words = dry_run(capsys, "--engine", "deepspeed", "--steps", "3")
    script = next(i for i, w in enumerate(words) if w.endswith("examples/deepspeed_lm.py"))
    assert words[script + 1:] == ["--config", str(ROOT / "configs" / "deepspeed_zero2.json"), "--steps", "3"]
    words = dry_run(capsys, "--engine", "deepspeed", "--config", "deepspeed_zero3")
    assert words[-2:] == ["--config", str(ROOT / "configs" / "deepspeed_zero3.json")]
    assert "invalid value for steps: 'x'" in launch_error(capsys, "--engine", "deepspeed", "--steps", "x")
    assert "config file not found" in launch_error(capsys, "--engine", "deepspeed", "--config", "zero9")
    assert "is not a DeepSpeed config" in launch_error(capsys, "--engine", "deepspeed", "--config", "lm_small")


def dry_run(capsys, *argv: str) -> list[str]:
    assert cli.main(["--dry-run", *argv]) == 0
    return capsys.readouterr().out.split()


def test_defaults_two_gloo_processes_on_cpu(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    words = dry_run(capsys)
    assert words[:4] == ["torchrun", "--standalone", "--nproc-per-node", "2"]
    assert words[4].endswith("examples/train_lm.py")


def test_defaults_one_process_per_gpu(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    assert dry_run(capsys)[:4] == ["torchrun", "--standalone", "--nproc-per-node", "8"]


def test_torchrun_options_pass_through(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    words = dry_run(capsys, "--nnodes", "2", "--node-rank=1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                    "10.0.0.1:29400", "--rdzv-id", "job7", "--max-restarts", "3", "--engine", "ddp", "--steps", "9",
                    "seed=4")
    assert "--standalone" not in words  # a multi-node rendezvous was given
    script = next(i for i, w in enumerate(words) if w.endswith("train_lm.py"))
    assert words[1:script] == ["--nproc-per-node", "2", "--nnodes", "2", "--node-rank=1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", "10.0.0.1:29400", "--rdzv-id", "job7", "--max-restarts", "3"]
    assert words[script + 1:] == ["--engine", "ddp", "--steps", "9", "seed=4"]


def test_single_engine_is_a_plain_process(capsys):
    words = dry_run(capsys, "--engine", "single", "--out", "runs/x")
    assert words[0] == "python" and words[1].endswith("examples/train_lm.py")
    assert words[2:] == ["--engine", "single", "--out", "runs/x"]


def test_config_names_its_example(capsys):
    words = dry_run(capsys, "--config", "image_digits")  # a bare name is looked up in configs/
    assert words[0] == "python" and words[1].endswith("examples/image_classification.py")  # its engine: single


def test_overrides_convert_to_the_field_type():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Example:
        steps: int = 1
        lr: float = 0.5
        name: str = "a"
        flag: bool = False

    changed = apply(Example(), dict(parse_override(w) for w in ["steps=7", "lr=1e-3", "name=b=c", "flag=yes"]),
                    "test")
    assert changed == Example(steps=7, lr=1e-3, name="b=c", flag=True)
    with pytest.raises(ConfigError, match="invalid value for lr: 'fast'"):
        apply(Example(), {"lr": "fast"}, "test")
    with pytest.raises(ConfigError, match="invalid value for steps: True"):
        apply(Example(), {"steps": True}, "test")  # a JSON true is not a step count


def test_entry_point_bad_input_one_line():
    """The real command (a fresh interpreter): no traceback, one line, exit code 2."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "launch", "--engine", "fsdp2", "n_layers=-1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.strip() == "prodigy-dist-launch: error: invalid value for n_layers: -1 (expected > 0)"


def test_yaml_config(tmp_path, capsys):
    import importlib.util

    from launch.config import read_config_file

    path = tmp_path / "short.yaml"
    path.write_text("example: train_lm\nsteps: 7\nd0: 1.0e-5\n")
    if importlib.util.find_spec("yaml") is None:
        assert "install PyYAML" in launch_error(capsys, "--config", str(path))
    else:
        assert read_config_file(str(path)) == {"example": "train_lm", "steps": 7, "d0": 1e-5}
        assert dry_run(capsys, "--config", str(path))[-2:] == ["--config", str(path)]
