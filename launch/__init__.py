"""Run the examples on one or many processes: the ``prodigy-dist-launch`` command and what a run needs.

* :mod:`launch.cli`: the command (``prodigy-dist-launch`` / ``python -m launch``), built on ``torch.distributed.run``;
* :mod:`launch.config`: example configs (dataclass defaults, ``configs/*.json``, ``key=value`` overrides);
* :mod:`launch.engines`: process group, FSDP2 / DDP / single-process model wrapping, clean exit;
* :mod:`launch.checkpoints`: DCP checkpoints of model, optimizer, step and RNG, and finding the last complete one;
* :mod:`launch.metrics`: the JSONL metrics file and the loss / d plot.
"""
