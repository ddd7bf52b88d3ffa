"""The ``snr-dist`` command line: ``snr-dist train --config configs/quickstart.yaml``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from snr_dist import __version__


def _train(args: argparse.Namespace) -> int:
    from snr_dist.experiments.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"snr-dist: {e}", file=sys.stderr)
        return 2
    # Only now (config valid) import the heavy parts and start work.
    from snr_dist.experiments.report import write_report
    from snr_dist.experiments.trainer import init_world, run_experiment

    world = init_world(cfg)  # under torchrun: join the job
    out_dir = Path(args.output_dir or cfg.output_dir) / cfg.name
    if world.main:
        where = f" on {world.size} ranks ({world.strategy})" if world.size > 1 else ""
        print(f"snr-dist {__version__}: {cfg.name}{where} -> {out_dir}/", flush=True)
    try:
        results = run_experiment(cfg, out_dir, False if args.no_progress else None, world)
        if world.main:
            command = "snr-dist " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            table = write_report(cfg, results, out_dir, command, world)
            print(table)
            print(f"wrote {out_dir}/metrics.jsonl, {out_dir}/report.md, {out_dir}/curves.png")
        world.barrier()
    finally:
        if world.size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snr-dist", description=__doc__)
    parser.add_argument("--version", action="version", version=f"snr-dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the configured optimizers side by side")
    train.add_argument("--config", required=True, help="YAML experiment config")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. --set train.epochs=20 "
        "--set optimizers.1.snr.tau=0.5 (repeatable)",
    )
    train.add_argument("--output-dir", help="parent folder of the run (default: the config's)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
