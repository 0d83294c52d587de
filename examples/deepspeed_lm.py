"""Train a small character-level language model with DeepSpeed and ProdigyPlusScheduleFree named in the config.

    torchrun --standalone --nproc_per_node=2 examples/deepspeed_lm.py --config configs/deepspeed_zero2.json
    deepspeed --num_gpus 2 examples/deepspeed_lm.py --config configs/deepspeed_zero3.json --steps 50

The config says ``"optimizer": {"type": "ProdigyPlusScheduleFree", "params": {...}}``; ``import prodigy_dist``
makes that name resolvable and handles ZeRO 0-3 (no ``zero_allow_untested_optimizer`` needed). On a machine without
GPU set ``DS_ACCELERATOR=cpu`` (gloo); the example then skips DeepSpeed's JIT-built shared-memory all-reduce op.
Schedule-Free keeps two weight sequences: call ``optimizer.train()`` before training steps and ``optimizer.eval()``
before evaluating or saving the weights to use.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys

import torch
import torch.distributed as dist

import prodigy_dist  # noqa: F401  (registers torch.optim.ProdigyPlusScheduleFree for the DeepSpeed config)
from prodigy_dist import deepspeed as pds

TEXT = (__doc__ or "") * 8


class CharLM(torch.nn.Module):
    """Embedding, causal self-attention blocks, tied-free output head."""

    def __init__(self, vocab: int, width: int = 64, layers: int = 2, heads: int = 4, context: int = 32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                             norm_first=True) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:t].to(self.embed.weight.dtype)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(t, dtype=h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def batches(data: torch.Tensor, batch: int, context: int, rank: int, world: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - context - 1, (batch * world,), generator=g)[rank::world]
        x = torch.stack([data[s:s + context] for s in starts])
        y = torch.stack([data[s + 1:s + context + 1] for s in starts])
        yield x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs",
                                                         "deepspeed_zero2.json"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--save", default=None, help="write the portable optimizer state (export_state) here")
    parser.add_argument("--local_rank", type=int, default=None)  # added by the deepspeed launcher
    args = parser.parse_args()

    if os.environ.get("DS_ACCELERATOR", "") == "cpu":
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no JIT C++ build on CPU
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo" if os.environ.get("DS_ACCELERATOR") == "cpu" else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    with open(args.config) as f:
        config = json.load(f)
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT], dtype=torch.long)
    torch.manual_seed(0)
    model = CharLM(len(chars), context=args.context)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    binding = pds.attach(engine)  # optional (done at the first step otherwise); reports conflicting settings
    base = engine.optimizer if hasattr(engine.optimizer, "metrics") else engine.optimizer.optimizer
    if rank == 0:
        print(f"ZeRO stage {binding.stage}, {world} ranks, {sum(p.numel() for p in model.parameters())} parameters")

    micro = config["train_micro_batch_size_per_gpu"]
    accum = config.get("gradient_accumulation_steps", 1)
    stream = batches(data, micro, args.context, rank, world)
    base.train()
    for step in range(1, args.steps + 1):
        total = 0.0
        for _ in range(accum):
            x, y = next(stream)
            logits = engine(x)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, len(chars)), y.reshape(-1))
            engine.backward(loss)
            engine.step()
            total += float(loss.detach()) / accum
        if rank == 0:
            m = base.metrics()
            print(f"step {step} loss {total:.4f} ppl {math.exp(min(total, 20)):.2f} d {m['d/0']:.3e} "
                  f"lr*d {m['dlr/0']:.3e}", flush=True)
    base.eval()  # the Schedule-Free average: the weights to evaluate or save
    if args.save:
        pds.export_state(engine, args.save)
        if rank == 0:
            print(f"optimizer state exported to {args.save}")
    base.train()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo may abort in interpreter shutdown (TESTING-ON-CPU.md)


if __name__ == "__main__":
    main()
