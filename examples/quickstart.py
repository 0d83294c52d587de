"""Quick start: a small character-level language model trained with ProdigyPlusScheduleFree on one process.

The text is Python's own documentation (``pydoc_data.topics``), so nothing is downloaded. The model reads 16
characters and predicts the next one. Training takes about a minute on a laptop CPU:

    python examples/quickstart.py                # default options
    python examples/quickstart.py --muon         # Muon on the hidden matrices (use_muon_pp)

The Schedule-Free contract: call ``optimizer.train()`` before training steps and ``optimizer.eval()`` before
evaluating (the weights then hold the averaged iterate).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch import nn

from prodigy_dist import ProdigyPlusScheduleFree

CONTEXT = 16


def corpus() -> torch.Tensor:
    """Python's documentation topics as a tensor of byte values."""
    from pydoc_data.topics import topics
    text = "\n".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(text.encode("ascii", "replace")), dtype=torch.long)


class CharModel(nn.Module):
    def __init__(self, vocab: int = 128, dim: int = 48, hidden: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(CONTEXT * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.head(self.body(self.embed(x).flatten(1)))


def batches(data: torch.Tensor, batch: int, generator: torch.Generator):
    while True:
        idx = torch.randint(0, data.numel() - CONTEXT - 1, (batch,), generator=generator)
        window = torch.stack([data[i:i + CONTEXT + 1] for i in idx.tolist()])
        yield window[:, :-1], window[:, 1:].contiguous()[:, -1]


def param_groups(model: CharModel, muon: bool) -> list[dict]:
    """Muon on the hidden matrices; embedding and output head stay on the Adam path (the usual Muon recipe)."""
    hidden = [p for p in model.body.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    return [dict(params=hidden, use_muon_pp=muon), dict(params=rest, use_muon_pp=False)]


def train(steps: int = 600, batch: int = 64, muon: bool = False, seed: int = 0, log_every: int = 100,
          **options) -> dict[str, float]:
    """Train and return the final held-out loss and the optimizer's metrics."""
    data = corpus()
    split = int(0.9 * data.numel())
    train_data, test_data = data[:split], data[split:]
    torch.manual_seed(seed)
    model = CharModel()
    opt = ProdigyPlusScheduleFree(param_groups(model, muon), **options)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    test_gen = torch.Generator().manual_seed(seed + 1)
    test_x, test_y = next(batches(test_data, 2048, test_gen))

    def evaluate() -> float:
        model.eval()
        opt.eval()  # the averaged weights
        with torch.no_grad():
            loss = loss_fn(model(test_x), test_y).item()
        model.train()
        opt.train()
        return loss

    start = time.time()
    opt.train()
    for step, (x, y) in zip(range(1, steps + 1), batches(train_data, batch, gen)):
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and step % log_every == 0:
            m = opt.metrics()
            logging.info("step %4d  train loss %.3f  test loss %.3f  d %.3g  (%.1fs)", step, loss.item(),
                         evaluate(), m["d/0"], time.time() - start)
    return dict(test_loss=evaluate(), **opt.metrics())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--muon", action="store_true", help="use_muon_pp on the hidden matrices")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = train(args.steps, args.batch, args.muon, args.seed)
    logging.info("final test loss %.3f, d %.3g (start: ln(128) = 4.852)", result["test_loss"], result["d/0"])


if __name__ == "__main__":
    main()
