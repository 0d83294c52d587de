"""Image classification with ProdigyPlusScheduleFree: scikit-learn's handwritten digits (8x8, 10 classes).

The data ships with scikit-learn (no download). A small CNN trains for a few epochs; before each test pass the
optimizer switches to the Schedule-Free average (``optimizer.eval()``), and back (``optimizer.train()``) before the
next epoch. Prints the test loss and accuracy per epoch and writes them to ``OUT/metrics.jsonl``.

    python examples/image_classification.py                       # one process
    prodigy-dist-launch --config configs/image_digits.json        # the same through the launcher
    prodigy-dist-launch --config configs/image_digits.json --engine ddp    # 2 processes, each half the batches
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import launch  # noqa: F401  (installed with the package)
except ImportError:  # a clone used without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch import engines
from launch.config import (Parser, add_config_arguments, check_choice, check_non_negative, parse_or_exit,
                           check_positive, describe, resolve)
from launch.metrics import MetricsLog

EXAMPLE = "image_classification"


@dataclass(frozen=True)
class DigitsConfig:
    engine: str = "single"
    epochs: int = 10
    batch_size: int = 32  # images per process and step
    steps_per_epoch: int = 0  # 0: a full pass over the training images
    channels: int = 16
    seed: int = 0
    out: str = "runs/digits"

    def check(self) -> None:
        check_choice(self, "engine", ("fsdp2", "ddp", "single"))
        check_positive(self, "epochs", "batch_size", "channels")
        check_non_negative(self, "steps_per_epoch", "seed")


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels): 80/20 split, pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("image_classification.py needs scikit-learn: pip install scikit-learn") from None
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    return images[train], labels[train], images[test], labels[test]


class SmallCNN(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))  # 8x8 -> 4x4
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * channels * 16, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def epoch_batches(n: int, config: DigitsConfig, epoch: int, runtime: engines.Runtime):
    """This rank's index batches of one epoch: a permutation seeded by (seed, epoch), split across ranks."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
    per_step = config.batch_size * runtime.world
    steps = n // per_step if config.steps_per_epoch == 0 else min(config.steps_per_epoch, n // per_step)
    for s in range(steps):
        chunk = order[s * per_step:(s + 1) * per_step]
        yield chunk[runtime.rank * config.batch_size:(runtime.rank + 1) * config.batch_size]


@torch.no_grad()
def test_pass(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    logits = model(images)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def train(config: DigitsConfig, runtime: engines.Runtime) -> list[dict]:
    from prodigy_dist import ProdigyPlusScheduleFree

    x_train, y_train, x_test, y_test = (t.to(runtime.device) for t in digits(config.seed))
    torch.manual_seed(config.seed)
    model = engines.distribute(SmallCNN(config.channels).to(runtime.device), runtime, [])
    optimizer = ProdigyPlusScheduleFree(model.parameters())
    log = MetricsLog(Path(config.out) / "metrics.jsonl", runtime.is_main, None)
    if runtime.is_main:
        (Path(config.out) / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")
    history = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        optimizer.train()  # weights at y: where gradients are taken
        total, count = torch.zeros(()), 0
        for idx in epoch_batches(len(y_train), config, epoch, runtime):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach().cpu()
            count += 1
        model.eval()
        optimizer.eval()  # weights at x, the Schedule-Free average: evaluate these
        test_loss, accuracy = test_pass(model, x_test, y_test)
        record = {"epoch": epoch, "step": int(optimizer.metrics()["step"]),
                  "train_loss": engines.mean_across_ranks(total / max(count, 1), runtime),
                  "test_loss": test_loss, "accuracy": accuracy, "d/0": optimizer.metrics()["d/0"]}
        history.append(record)
        log.append(record)
        if runtime.is_main:
            print(f"epoch {epoch:2d}  train loss {record['train_loss']:.4f}  test loss {test_loss:.4f}  "
                  f"accuracy {100 * accuracy:.1f}%  d {record['d/0']:.3g}", flush=True)
    return history


def parse_args(argv: list[str] | None = None):
    parser = Parser(prog="image_classification.py", description=__doc__.split("\n\n")[0],
                    epilog=describe(DigitsConfig()))
    add_config_arguments(parser, DigitsConfig.engine)
    args = parser.parse_args(argv)
    return resolve(DigitsConfig(), args, EXAMPLE), args


def main(argv: list[str] | None = None) -> None:
    config, _ = parse_or_exit(parse_args, argv, "image_classification.py")
    runtime = engines.start(config.engine)
    if runtime.is_main:
        Path(config.out).mkdir(parents=True, exist_ok=True)
    engines.run_and_finish(lambda: train(config, runtime))


if __name__ == "__main__":
    main()
