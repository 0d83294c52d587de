"""Recipe: ProdigyPlusScheduleFree with the Hugging Face Trainer.

    pip install transformers accelerate
    python examples/recipes/hf_trainer.py --steps 100

What matters:

* ``optimizer_cls_and_kwargs=(ProdigyPlusScheduleFree, {...})``: the Trainer builds the optimizer from its
  parameter groups (decay / no decay);
* ``learning_rate=1.0`` (d is the learning rate), ``lr_scheduler_type="constant"`` (Schedule-Free needs no schedule:
  the Trainer's default linear decay would multiply d by a shrinking factor) and ``max_grad_norm=0`` (no clipping);
* the Trainer calls ``optimizer.train()`` before each training step and ``optimizer.eval()`` before evaluating; call
  ``trainer.optimizer.eval()`` yourself before ``trainer.save_model()`` so that the exported weights are the
  Schedule-Free average (Trainer checkpoints for resuming may be saved in either mode);
* :class:`LogProdigyD` adds ``d`` (per group) to the Trainer's logs.

A tiny GPT-2 (random init, no download) learns the bytes of Python's documentation (``pydoc_data.topics``).
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from prodigy_dist import ProdigyPlusScheduleFree


class LogProdigyD(TrainerCallback):
    """Records d after every step and adds it to the Trainer's logs (console, TensorBoard, W&B, ...)."""

    def __init__(self):
        self.d: list[float] = []
        self._last: dict[str, float] = {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        opt = getattr(optimizer, "optimizer", optimizer)  # the Trainer hands over accelerate's wrapper
        if hasattr(opt, "metrics"):
            metrics = opt.metrics()  # no device synchronisation: read at the optimizer's own sync
            self._last = {k: v for k, v in metrics.items() if k.startswith("d/")}
            self.d.append(metrics["d/0"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs.update(self._last)


class ByteWindows(torch.utils.data.Dataset):
    def __init__(self, context: int, count: int, seed: int = 0):
        from pydoc_data.topics import topics

        data = torch.tensor(list("\n".join(topics[k] for k in sorted(topics)).encode("ascii", "replace")))
        starts = torch.randint(0, data.numel() - context, (count,), generator=torch.Generator().manual_seed(seed))
        self.windows = data[starts[:, None] + torch.arange(context)]

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}  # the model shifts the labels itself


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="runs/hf_trainer")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=2))
    log_d = LogProdigyD()
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=16,
                                 learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                                 logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[],
                                 use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=ByteWindows(64, 16 * args.steps),
                      eval_dataset=ByteWindows(64, 64, seed=1),
                      optimizer_cls_and_kwargs=(ProdigyPlusScheduleFree, {"d0": 1e-5}), callbacks=[log_d])
    trainer.train()
    print("eval:", trainer.evaluate())  # the Trainer switched the optimizer to eval mode (the averaged weights)
    trainer.optimizer.eval()
    trainer.save_model(args.out)  # the Schedule-Free average
    print(f"d: {log_d.d[0]:.3g} -> {log_d.d[-1]:.3g}")
    return log_d.d


if __name__ == "__main__":
    main()
