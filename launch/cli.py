"""``prodigy-dist-launch`` / ``python -m launch``: run an example on several processes through torchrun.

    prodigy-dist-launch [torchrun options] [--script PATH] [--dry-run] [example options] [key=value ...]

* torchrun's own options (``--nproc-per-node``, ``--nnodes``, ``--node-rank``, ``--rdzv-backend``,
  ``--rdzv-endpoint``, ``--rdzv-id``, ``--max-restarts``, ``--master-addr``, ...) are passed to
  ``torch.distributed.run`` unchanged; the launcher only fills in defaults: one process per GPU when CUDA is
  available (the examples then use NCCL), else 2 processes (gloo), and ``--standalone`` for a one-node run.
* The example is the one the config names (``"example"`` in ``configs/*.json``; default ``train_lm``) or
  ``--script``. Its options (``--config``, ``--engine``, ``--steps``, ``--batch-size``, ``--out``, ``--seed``,
  ``--resume``, ``--compare``, ``key=value``) are checked here, in the launcher process, by the example's own parser,
  so bad input stops with one line before any worker starts.
* ``--engine single`` runs one plain process (no torchrun, no process group); ``--engine deepspeed`` runs the
  DeepSpeed example (``examples/deepspeed_lm.py``) with a DeepSpeed JSON from ``configs/``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from .config import ROOT, ConfigError, example_of, find_config

PROG = "prodigy-dist-launch"
EXAMPLES = ROOT / "examples"
DEFAULT_EXAMPLE = "train_lm"
DEEPSPEED_EXAMPLE = EXAMPLES / "deepspeed_lm.py"
DEEPSPEED_DEFAULT_CONFIG = "configs/deepspeed_zero2.json"
#: torchrun options that change what is run; the launcher decides that itself.
REFUSED = ("-m", "--module", "--no-python", "--no_python", "--run-path", "--run_path")


def _torchrun_options() -> dict[str, argparse.Action]:
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    return {s: a for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}


def split_torchrun_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options with their values, everything else), in order."""
    options = _torchrun_options()
    ours, theirs = [], []
    i = 0
    while i < len(argv):
        word = argv[i]
        name = word.split("=", 1)[0]
        if word == "--":  # the rest belongs to the script
            ours += argv[i + 1:]
            break
        if name in REFUSED:
            raise ConfigError(f"{name} is not supported here: the launcher runs the example script itself")
        action = options.get(name)
        if action is None:
            ours.append(word)
        elif action.nargs == 0:
            if "=" in word:
                raise ConfigError(f"{name} takes no value")
            theirs.append(word)
        elif "=" in word:
            theirs.append(word)
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{name} needs a value")
            theirs += [word, argv[i + 1]]
            i += 1
        i += 1
    return theirs, ours


def _option_value(args: list[str], *names: str) -> str | None:
    """The last value given to any of ``names`` in an argument list (``--x v`` or ``--x=v``)."""
    value = None
    for i, word in enumerate(args):
        name, sep, inline = word.partition("=")
        if name in names:
            value = inline if sep else (args[i + 1] if i + 1 < len(args) else None)
    return value


def load_example(path: Path) -> ModuleType:
    """Import an example script as a module (its ``main()`` does not run)."""
    if not path.is_file():
        raise ConfigError(f"example script not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    if not hasattr(module, "parse_args"):
        raise ConfigError(f"{path} has no parse_args(argv): it is not an example the launcher can check")
    return module


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], add_help=False,
                                     allow_abbrev=False)
    parser.add_argument("--script", help="the example to run (default: the config's 'example', else train_lm)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    return parser


def print_help() -> None:
    print(__doc__)
    print(f"Options of the default example ({DEFAULT_EXAMPLE}):\n")
    try:
        load_example(EXAMPLES / f"{DEFAULT_EXAMPLE}.py").parse_args(["--help"])
    except SystemExit:
        pass


def _deepspeed_command(script_args: list[str]) -> tuple[Path, list[str]]:
    """The DeepSpeed example and its arguments (``--config``: a DeepSpeed JSON, default ZeRO-2)."""
    if not DEEPSPEED_EXAMPLE.is_file():
        raise ConfigError(f"--engine deepspeed needs {DEEPSPEED_EXAMPLE.relative_to(ROOT)}, which is not in this "
                          "checkout yet (DeepSpeed support is issue 4); use --engine fsdp2, ddp or single")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("--engine deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'")
    rest = [w for i, w in enumerate(script_args) if not (w.startswith("--engine") or w == "engine=deepspeed" or
                                                          (i > 0 and script_args[i - 1] == "--engine"))]
    config = _option_value(rest, "--config")
    if config is None:
        rest = ["--config", str(ROOT / DEEPSPEED_DEFAULT_CONFIG)] + rest
    else:
        path = find_config(config)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON: {exc}") from None
        if not isinstance(data, dict) or "example" in data:
            raise ConfigError(f"{path} is not a DeepSpeed config: --engine deepspeed takes a DeepSpeed JSON such as "
                              "configs/deepspeed_zero2.json")
        rest = [w for i, w in enumerate(rest) if not (w.startswith("--config") or
                                                      (i > 0 and rest[i - 1] == "--config"))]
        rest = ["--config", str(path)] + rest
    steps = _option_value(rest, "--steps")
    if steps is not None and not (steps.isdigit() and int(steps) > 0):
        raise ConfigError(f"invalid value for steps: {steps!r} (expected > 0)")
    if "def parse_args" in DEEPSPEED_EXAMPLE.read_text():  # the example can check the rest itself
        load_example(DEEPSPEED_EXAMPLE).parse_args(rest)
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # inherited by the workers: DeepSpeed on gloo
    return DEEPSPEED_EXAMPLE, rest


def build_command(argv: list[str]) -> tuple[str, list[str], bool]:
    """Check everything; return ``("single", python argv)`` or ``("torchrun", torchrun argv)``, and whether this is
    a dry run."""
    torchrun_args, rest = split_torchrun_args(argv)
    ours, script_args = _parser().parse_known_args(rest)
    if not ours.script and not EXAMPLES.is_dir():
        raise ConfigError(f"no examples/ next to the launch package ({ROOT}): install from a clone with "
                          "pip install -e . (or name a script with --script)")
    engine = _option_value(script_args, "--engine")
    if "engine=deepspeed" in script_args:
        engine = "deepspeed"
    if engine == "deepspeed":
        script, script_args = _deepspeed_command(script_args)
    else:
        example = example_of(_option_value(script_args, "--config"))
        if ours.script:
            script = Path(ours.script)
        else:
            script = EXAMPLES / f"{example or DEFAULT_EXAMPLE}.py"
            if not script.is_file():
                raise ConfigError(f"the config names example {example!r}, but {script} does not exist")
        config, _ = load_example(script).parse_args(script_args)
        engine = config.engine
    if engine == "single":
        if torchrun_args:
            raise ConfigError(f"--engine single runs one plain process: drop the torchrun options {torchrun_args}")
        return "single", [sys.executable, str(script), *script_args], ours.dry_run
    nproc = _option_value(torchrun_args, "--nproc-per-node", "--nproc_per_node")
    if nproc is None:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        torchrun_args = ["--nproc-per-node", str(count or 2)] + torchrun_args
    multi_node = any(_option_value(torchrun_args, n) is not None for n in
                     ("--nnodes", "--rdzv-endpoint", "--rdzv_endpoint", "--master-addr", "--master_addr",
                      "--master-port", "--master_port"))
    if not multi_node and "--standalone" not in torchrun_args:
        torchrun_args = ["--standalone"] + torchrun_args
    command = [*torchrun_args, str(script), *script_args]
    parse_torchrun(command)
    return "torchrun", command, ours.dry_run


def parse_torchrun(command: list[str]) -> argparse.Namespace:
    """torchrun's own parse of its arguments, with :class:`ConfigError` instead of usage-and-exit."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()

    def error(message: str):
        raise ConfigError(f"torchrun: {message}")

    parser.error = error
    args = parser.parse_args(command)
    nproc = str(args.nproc_per_node)
    if not (nproc in ("auto", "cpu", "gpu", "xpu") or (nproc.isdigit() and int(nproc) > 0)):
        raise ConfigError(f"invalid --nproc-per-node: {nproc!r} (expected a number > 0, auto, cpu or gpu)")
    if args.max_restarts < 0:
        raise ConfigError(f"invalid --max-restarts: {args.max_restarts} (expected >= 0)")
    return args


def run(kind: str, command: list[str]) -> int:
    """Run a command from :func:`build_command`; return the exit code."""
    if kind == "single":
        return subprocess.call(command)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several processes, without its warning
    try:
        torchrun(parse_torchrun(command))
    except ChildFailedError as exc:
        rank, first = exc.get_first_failure()
        print(f"{PROG}: error: {len(exc.failures)} worker(s) failed (first: rank {rank}, exit code "
              f"{first.exitcode}); their output is above", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(w in ("-h", "--help") for w in argv):
        print_help()
        return 0
    try:
        kind, command, dry_run = build_command(argv)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if dry_run:
        print(" ".join(["python", *command[1:]] if kind == "single" else ["torchrun", *command]))
        return 0
    return run(kind, command)


def console() -> None:
    """Entry point of the ``prodigy-dist-launch`` console script."""
    sys.exit(main())
