"""`python -m hanuman_jax.train` (or `hanuman-train`): train a model from a config, resuming the
run in its workdir."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hanuman_jax import cli
from hanuman_jax.config import ConfigError, ModelConfig, load_config
from hanuman_jax.data import DataError

CLUSTER_FLAGS = ("coordinator_address", "num_processes", "process_id")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The flags, and the --config.section.key=value overrides in the order given."""
    parser = cli.make_parser("hanuman_jax.train", "Train a hanuman_jax model.")
    cli.add_config_flag(parser)
    parser.add_argument("--workdir", help="run directory (default: runs/<config name>)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model abstractly and print parameter counts and FLOPs; no training",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--check-platform",
        choices=("tpu", "cuda"),
        help="lower the train, evaluation and generation steps for this platform on abstract "
        "devices (nothing compiled) and print one JSON line; no training",
    )
    parser.add_argument(
        "--check-devices",
        type=int,
        metavar="N",
        help="--check-platform: devices to lower for (default: the mesh's; where an axis is -1, "
        "8 for tpu, 1 for cuda)",
    )
    cluster = parser.add_argument_group(
        "multi-process", "one process per host; jax.distributed.initialize detects unset values\n"
        "from the cluster environment (SLURM, Open MPI, Cloud TPU, ...)"
    )  # fmt: skip
    cluster.add_argument(
        "--distributed", action="store_true", help="join the other processes before training"
    )
    cluster.add_argument("--coordinator-address", metavar="HOST:PORT", help="process 0's address")
    cluster.add_argument("--num-processes", type=int, help="how many processes in all")
    cluster.add_argument("--process-id", type=int, help="this process's index, from 0")
    args, overrides = cli.parse_with_overrides(parser, argv)
    given = [f"--{k.replace('_', '-')}" for k in CLUSTER_FLAGS if getattr(args, k) is not None]
    if given and not args.distributed:
        parser.error(f"{', '.join(given)} only apply with --distributed")
    if args.check_devices is not None and not args.check_platform:
        parser.error("--check-devices only applies with --check-platform")
    if args.check_platform and args.dry_run:
        parser.error("--check-platform and --dry-run are two different checks: pass one")
    return args, overrides


def join_cluster(args: argparse.Namespace) -> None:
    """jax.distributed.initialize, before anything asks jax for its devices."""
    import jax

    try:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(
            f"--distributed: could not join the cluster ({str(e).splitlines()[0]}); pass "
            "--coordinator-address HOST:PORT --num-processes N --process-id I, or run under a "
            "cluster manager that jax.distributed detects"
        ) from None


# XLA:CPU's default scheduler runs independent work concurrently, and so computes what remat
# recomputes as early as it can, keeping it alive as long as saved activations would be: with it,
# remat on CPU costs time and saves little memory. The memory-minimising scheduler keeps the
# recomputation where it belongs (measured in BENCHMARKS.md). GPU and TPU ignore the flag.
REMAT_CPU_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def set_xla_flags(cfg) -> None:
    """Adds the XLA flags the config needs to XLA_FLAGS (read when a backend starts)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if cfg.model.remat != "none" and REMAT_CPU_FLAG.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {REMAT_CPU_FLAG}".strip()


def dry_run(cfg) -> None:
    from hanuman_jax.data.schedule import SeqLenSchedule
    from hanuman_jax.model.build import count_params, train_flops_per_token

    model_cfg = ModelConfig.from_config(cfg.model)
    counts = count_params(model_cfg)
    flops = train_flops_per_token(model_cfg, cfg.data.seq_len)
    print(f"total parameters:  {counts['total']:,}")
    print(f"active parameters: {counts['active']:,} per token")
    print(f"training FLOPs per token: {flops:.4g} (seq_len {cfg.data.seq_len})")
    per_step = cfg.train.batch_size * cfg.data.seq_len
    phases = SeqLenSchedule.from_config(cfg).phases
    ends = [first for first, _ in phases[1:]] + [cfg.train.steps]
    total = 0.0
    for (first, length), end in zip(phases, ends, strict=True):
        total += (end - first) * per_step * train_flops_per_token(model_cfg, length)
        if len(phases) > 1:
            print(f"  steps {first:,}-{end - 1:,}: rows of {length} tokens")
    tokens = cfg.train.steps * per_step
    print(f"run: {cfg.train.steps:,} steps x {per_step:,} tokens = {tokens:.4g} tokens, "
          f"{total:.4g} FLOPs")  # fmt: skip


def resolve_vocab(cfg) -> None:
    """model.vocab_size 0 read from the tokenizer."""
    if cfg.model.vocab_size == 0:
        from hanuman_jax.training.loop import load_tokenizer

        load_tokenizer(cfg)


def check_platform(cfg, platform: str, devices: int | None) -> int:
    """Lowers the config's steps for `platform` and prints the report as one JSON line."""
    import json

    from hanuman_jax.planning.check_platform import check_platform as check

    resolve_vocab(cfg)
    print(json.dumps(check(cfg, platform, devices)[0]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cli.setup_logging()
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:  # compiles nothing: no XLA flags, which would outlive the call
            resolve_vocab(cfg)
            dry_run(cfg)
            return 0
        if args.check_platform:
            return check_platform(cfg, args.check_platform, args.check_devices)
        set_xla_flags(cfg)  # before anything starts a JAX backend
        if args.distributed:
            join_cluster(args)
        from hanuman_jax.training.loop import NonFiniteError, train

        workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
        try:
            train(cfg, workdir, progress=not args.no_progress)
        except NonFiniteError as e:
            return cli.fail(e)
    except (ConfigError, DataError) as e:
        return cli.fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
