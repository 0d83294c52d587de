"""The main job: a small GPT-style language model trained with ProdigyPlusScheduleFree, FSDP2 by default.

The text is the English documentation that Python ships (``pydoc_data.topics``), read byte by byte, so nothing is
downloaded. Run it through the launcher (2 gloo processes on a CPU, one process per GPU with NCCL) or directly:

    prodigy-dist-launch                                   # = python -m launch; default config, FSDP2
    prodigy-dist-launch --engine ddp --steps 500 --out runs/ddp
    prodigy-dist-launch --resume                          # continue from the last complete checkpoint
    prodigy-dist-launch --compare adamw                   # the same job with AdamW + cosine schedule, both plotted
    torchrun --standalone --nproc-per-node 2 examples/train_lm.py --config configs/lm_small.json
    python examples/train_lm.py --engine single d_model=64 n_layers=2

The run directory (``--out``, default ``runs/lm``) receives ``metrics.jsonl`` (per step: loss, d, dlr and effective
LR per parameter group; eval loss every ``eval_every`` steps), ``loss_d.png``, ``summary.json``, DCP checkpoints
every ``checkpoint_every`` steps in ``checkpoints/`` and the final (Schedule-Free averaged) weights in ``model.pt``.
The data order is a pure function of (seed, step, rank), so a resumed or restarted run repeats the uninterrupted one
exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import launch  # noqa: F401  (installed with the package)
except ImportError:  # a clone used without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch import checkpoints, engines
from launch.config import (ConfigError, Parser, add_config_arguments, check_choice, check_non_negative, parse_or_exit,
                           check_positive, describe, resolve)
from launch.metrics import MetricsLog, plot, read

EXAMPLE = "train_lm"
VOCAB = 128  # ASCII


@dataclass(frozen=True)
class LMConfig:
    """The embedded default config (configs/lm_small.json spells it out)."""

    engine: str = "fsdp2"
    # model
    context: int = 64
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    # training
    steps: int = 300
    batch_size: int = 16  # sequences per process and step
    seed: int = 0
    optimizer: str = "prodigy"  # or "adamw" (what --compare adamw runs)
    weight_decay: float = 0.0
    d0: float = 1e-6  # Prodigy's initial d
    adamw_lr: float = 3e-3  # AdamW peak LR (cosine schedule to 10% after a linear warmup)
    warmup: int = 20  # AdamW warmup steps
    # run directory
    out: str = "runs/lm"
    eval_every: int = 50  # 0: only at the end
    eval_batches: int = 4
    checkpoint_every: int = 100  # 0: only at the end
    progress: bool = True

    def check(self) -> None:
        check_choice(self, "engine", ("fsdp2", "ddp", "single"))
        check_choice(self, "optimizer", ("prodigy", "adamw"))
        check_positive(self, "context", "d_model", "n_layers", "n_heads", "steps", "batch_size", "eval_batches",
                       "d0", "adamw_lr")
        check_non_negative(self, "seed", "weight_decay", "warmup", "eval_every", "checkpoint_every")
        if self.d_model % self.n_heads:
            raise ConfigError(f"invalid d_model: {self.d_model} is not a multiple of n_heads={self.n_heads}")
        if not self.out:
            raise ConfigError("invalid value for out: '' (expected a directory)")


# ---------------------------------------------------------------------------------------------------- data
def corpus() -> torch.Tensor:
    """Python's documentation topics as byte values < 128."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[key] for key in sorted(topics))
    return torch.tensor(list(text.encode("ascii", "replace")), dtype=torch.long)


def split(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(0.95 * data.numel())
    return data[:cut], data[cut:]


def batch(data: torch.Tensor, config: LMConfig, key: int, runtime: engines.Runtime):
    """This rank's slice of the global batch number ``key``: a pure function of (seed, key, rank, world)."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + key)
    starts = torch.randint(0, data.numel() - config.context - 1, (config.batch_size * runtime.world,),
                           generator=generator)
    mine = starts[runtime.rank * config.batch_size:(runtime.rank + 1) * config.batch_size]
    window = data[mine[:, None] + torch.arange(config.context + 1)].to(runtime.device)
    return window[:, :-1], window[:, 1:]


# ---------------------------------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, config.d_model)
        self.positions = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_heads) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, VOCAB, bias=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layers) if name.endswith(("proj.weight",
                                "mlp.2.weight")) else 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------------------------------- optimizer
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (decayed) and the rest (embeddings, norms, biases: not decayed); one d per group."""
    named = list(model.named_parameters())
    matrices = [p for n, p in named if p.dim() >= 2 and "tokens" not in n and "positions" not in n]
    ids = {id(p) for p in matrices}
    rest = [p for _, p in named if id(p) not in ids]
    return [dict(params=matrices, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


def build_optimizer(config: LMConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Built after the engine distributed the model (FSDP2 replaces the parameters by sharded ones)."""
    groups = param_groups(model, config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.adamw_lr, betas=(0.9, 0.95))
    from prodigy_dist import ProdigyPlusScheduleFree

    return ProdigyPlusScheduleFree(groups, d0=config.d0)


def adamw_lr(config: LMConfig, step: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak at the last step."""
    if step <= config.warmup:
        return config.adamw_lr * step / max(1, config.warmup)
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.adamw_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def step_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """What the metrics file records of the optimizer: d, d*lr and the effective LR per group (no device sync)."""
    if hasattr(optimizer, "metrics"):
        return {k: v for k, v in optimizer.metrics().items() if k.startswith(("d/", "dlr/", "effective_lr/"))}
    return {f"lr/{i}": g["lr"] for i, g in enumerate(optimizer.param_groups)}


def set_mode(model: nn.Module, optimizer: torch.optim.Optimizer, train: bool) -> None:
    """Schedule-Free: the weights hold y while training and the average x for evaluation."""
    model.train(train)
    if hasattr(optimizer, "train"):
        optimizer.train() if train else optimizer.eval()


# ---------------------------------------------------------------------------------------------------- output
class _LineProgress:
    """Without tqdm: one line every 10% of the run."""

    def __init__(self, total: int, initial: int):
        self.total, self.n, self.postfix = total, initial, ""

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def update(self, n: int) -> None:
        self.n += n
        if self.n % max(1, self.total // 10) == 0 or self.n == self.total:
            print(f"step {self.n}/{self.total}  {self.postfix}", flush=True)

    def close(self) -> None:
        pass


def progress_bar(config: LMConfig, start_step: int):
    try:
        from tqdm import tqdm
    except ImportError:  # pip install tqdm (in the examples and test extras) for a live bar
        return _LineProgress(config.steps, start_step)
    return tqdm(total=config.steps, initial=start_step, desc=config.optimizer, dynamic_ncols=True, mininterval=0.5)


def save_plot(path: Path, runs: dict, title: str) -> Path | None:
    try:
        return plot(path, runs, title=title)
    except ImportError:
        print(f"{EXAMPLE}: no plot ({path.name}): pip install matplotlib", flush=True)
        return None


# ---------------------------------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(model: nn.Module, optimizer, data: torch.Tensor, config: LMConfig, runtime) -> float:
    set_mode(model, optimizer, train=False)
    total = torch.zeros((), device=runtime.device)
    for i in range(config.eval_batches):
        x, y = batch(data, config, -1 - i, runtime)  # negative keys: the fixed eval batches
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    set_mode(model, optimizer, train=True)
    return engines.mean_across_ranks(total / config.eval_batches, runtime)


def train(config: LMConfig, runtime: engines.Runtime, resume: bool, fail_at_step: int | None = None) -> dict:
    """Train (or continue) the job of ``config`` in ``config.out``; return its summary."""
    run_dir = Path(config.out)
    train_data, eval_data = split(corpus())
    torch.manual_seed(config.seed)
    model = GPT(config).to(runtime.device)
    n_params = sum(p.numel() for p in model.parameters())
    model = engines.distribute(model, runtime, list(model.blocks))
    optimizer = build_optimizer(config, model)

    start_step = 0
    found = checkpoints.latest(run_dir) if resume else None
    if found is not None:
        start_step = checkpoints.load(found[1], model, optimizer, runtime)
    elif not resume:
        checkpoints.remove_all(run_dir, runtime)
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")
        where = f"resuming at step {start_step} from {found[1]}" if found else "starting at step 0"
        print(f"{EXAMPLE}: {n_params / 1e6:.2f}M parameters, engine {runtime.engine} on {runtime.world} process(es) "
              f"({runtime.device.type}), optimizer {config.optimizer}, {where}", flush=True)
    log = MetricsLog(run_dir / "metrics.jsonl", runtime.is_main, start_step if found else None)

    tokens_per_step = config.batch_size * config.context * runtime.world
    set_mode(model, optimizer, train=True)
    bar = progress_bar(config, start_step) if runtime.is_main and config.progress else None
    began = time.perf_counter()
    for step in range(start_step + 1, config.steps + 1):
        if config.optimizer == "adamw":
            for group in optimizer.param_groups:
                group["lr"] = adamw_lr(config, step)
        x, y = batch(train_data, config, step, runtime)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if fail_at_step == step and runtime.rank == runtime.world - 1 and runtime.restart == 0:
            print(f"rank {runtime.rank}: --fail-at-step {step}: exiting to test the restart", flush=True)
            os._exit(1)
        record = {"step": step, "loss": engines.mean_across_ranks(loss, runtime), **step_metrics(optimizer)}
        if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
            record["eval_loss"] = evaluate(model, optimizer, eval_data, config, runtime)
        log.append(record)
        if bar is not None:
            rate = tokens_per_step * (step - start_step) / (time.perf_counter() - began)
            d = record.get("d/0", record.get("lr/0"))
            bar.set_postfix_str(f"loss {record['loss']:.3f}  {'d' if 'd/0' in record else 'lr'} {d:.3g}  "
                                f"{rate:,.0f} tok/s", refresh=False)
            bar.update(1)
        if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.steps:
            checkpoints.save(run_dir, step, model, optimizer, runtime)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - began

    set_mode(model, optimizer, train=False)  # the Schedule-Free average: evaluate and export these weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    summary = {}
    if runtime.is_main:
        torch.save(weights, run_dir / "model.pt")
        records = read(run_dir / "metrics.jsonl")
        last = records[-1]
        summary = {"optimizer": config.optimizer, "engine": runtime.engine, "processes": runtime.world,
                   "steps": last["step"], "first_loss": records[0]["loss"], "final_loss": last["loss"],
                   "final_eval_loss": last.get("eval_loss"), "seconds_this_launch": round(seconds, 1),
                   "tokens_per_second": round(tokens_per_step * (config.steps - start_step) / max(seconds, 1e-9)),
                   **{k: v for k, v in last.items() if k.startswith(("d/", "lr/"))}}
        if config.optimizer == "prodigy":
            summary["d0"] = config.d0
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        save_plot(run_dir / "loss_d.png", {config.optimizer: records}, f"{EXAMPLE} ({runtime.engine}, "
                  f"{runtime.world} process(es))")
        print(f"{EXAMPLE}: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} (eval "
              f"{summary['final_eval_loss']:.3f}); " + ", ".join(f"{k} {v:.3g}" for k, v in summary.items()
                                                              if k.startswith(("d/", "lr/")))
              + f"; {seconds:.1f}s; written to {run_dir}/", flush=True)
    return summary


def compare(config: LMConfig, runtime: engines.Runtime, resume: bool, other: str) -> None:
    """Train ``config`` and the same job with ``other`` (in ``OUT/other``); plot both in ``OUT/compare.png``."""
    train(config, runtime, resume)
    other_config = dataclasses.replace(config, optimizer=other, out=str(Path(config.out) / other))
    train(other_config, runtime, resume)
    if runtime.is_main:
        runs = {config.optimizer: read(Path(config.out) / "metrics.jsonl"),
                other: read(Path(other_config.out) / "metrics.jsonl")}
        path = save_plot(Path(config.out) / "compare.png", runs, f"{EXAMPLE}: {config.optimizer} vs {other}")
        finals = ", ".join(f"{k} eval loss {v[-1].get('eval_loss', float('nan')):.3f}" for k, v in runs.items())
        print(f"{EXAMPLE}: {finals}; plot {path}", flush=True)


def parse_args(argv: list[str] | None = None):
    """(config, arguments) from the command line; :class:`ConfigError` for any bad input (the launcher calls this
    before starting workers)."""
    parser = Parser(prog="train_lm.py", description=__doc__.split("\n\n")[0],
                    epilog=describe(LMConfig()))
    add_config_arguments(parser, LMConfig.engine)
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in --out")
    parser.add_argument("--compare", choices=("adamw",), help="also train the same job with this optimizer and plot "
                        "both")
    # hidden: the last rank exits at this step on the first attempt (tests torchrun's --max-restarts)
    parser.add_argument("--fail-at-step", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = resolve(LMConfig(), args, EXAMPLE)
    if args.compare and config.optimizer == args.compare:
        raise ConfigError(f"--compare {args.compare} with optimizer={config.optimizer}: compare with the other one")
    return config, args


def main(argv: list[str] | None = None) -> None:
    config, args = parse_or_exit(parse_args, argv, "train_lm.py")
    runtime = engines.start(config.engine)
    resume = args.resume or runtime.restart > 0  # torchrun restarted the workers: continue, never start over
    if args.compare:
        engines.run_and_finish(lambda: compare(config, runtime, resume, args.compare))
    else:
        engines.run_and_finish(lambda: train(config, runtime, resume, args.fail_at_step))


if __name__ == "__main__":
    main()
