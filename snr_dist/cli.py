"""The ``snr-dist`` command line: ``snr-dist train --config configs/quickstart.yaml``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from snr_dist import __version__


def _config_path(given: str, folder: str = "", suffix: str = ".yaml") -> Path:
    """A file path, or the name of a config that ships with snr-dist (``quickstart``,
    ``configs/quickstart.yaml`` from any directory, ``zero3_subspace`` for --deepspeed)."""
    from snr_dist import bundled

    if folder == "" and not Path(given).is_file():
        parts = Path(given).parts
        if len(parts) > 2 and parts[0] == "configs":  # configs/<folder>/<name>
            folder = parts[1]
    return bundled.resolve(given, folder, suffix)


def _train(args: argparse.Namespace) -> int:
    from snr_dist.experiments.config import ConfigError, load_config

    try:
        cfg = load_config(_config_path(args.config), args.set)
    except ConfigError as e:
        print(f"snr-dist: {e}", file=sys.stderr)
        return 2
    # Only now (config valid) import the heavy parts and start work.
    from snr_dist.checkpoint import CheckpointError
    from snr_dist.experiments.report import write_report
    from snr_dist.experiments.trainer import init_world, run_experiment

    if args.report_to == "tensorboard":
        from snr_dist.integrations.tensorboard import require

        try:
            require()
        except ImportError as e:
            print(f"snr-dist: {e}", file=sys.stderr)
            return 2
    ds_config = None
    if args.deepspeed:
        from snr_dist.deepspeed import (
            DeepSpeedConfigError,
            _load,
            check_support,
            experiment_options,
        )

        try:
            ds_config = _load(_config_path(args.deepspeed, "deepspeed", ".json"))
            ds_config.setdefault("zero_optimization", {})
            for o in cfg.optimizers:  # fail before any work on an unsupported stage/mode pair
                if o.type == "snr_adamw":
                    opts = experiment_options(o.snr, ds_config)
                    check_support(ds_config, opts)
                    if opts.estimator == "cross_sample" and cfg.train.microbatches < 2:
                        raise DeepSpeedConfigError(
                            f"optimizer {o.name!r} gets estimator 'cross_sample', which needs "
                            f"train.microbatches >= 2 in {args.config} (got "
                            f"{cfg.train.microbatches}; --set train.microbatches=2)"
                        )
        except DeepSpeedConfigError as e:
            print(f"snr-dist: {args.deepspeed}: {e}", file=sys.stderr)
            return 2
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    import torch.distributed as dist

    started = not dist.is_initialized()
    world = init_world(cfg, deepspeed=ds_config is not None)  # under torchrun: join the job
    out_dir = Path(args.output_dir or cfg.output_dir) / cfg.name
    if world.main:
        where = f" on {world.size} ranks ({world.strategy})" if world.size > 1 else ""
        if ds_config is not None:
            stage = ds_config["zero_optimization"].get("stage", 0)
            where += f" through DeepSpeed ZeRO-{stage}"
        print(f"snr-dist {__version__}: {cfg.name}{where} -> {out_dir}/", flush=True)
        block = (ds_config or {}).get("snr_preconditioner")
        if block:
            given = ", ".join(f"{k}={v}" for k, v in block.items())
            print(f"  SNRAdamW options from {args.deepspeed}: {given}", flush=True)
    try:
        try:
            results = run_experiment(
                cfg, out_dir, False if args.no_progress else None, world, ds_config, args.report_to
            )
        except (ConfigError, CheckpointError) as e:  # every rank finds the same, at the start
            if world.main:
                print(f"snr-dist: {e}", file=sys.stderr)
            return 2
        if world.main:
            command = "snr-dist " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            table = write_report(cfg, results, out_dir, command, world)
            print(table)
            wrote = ["metrics.jsonl", "report.md", "curves.png"]
            wrote += ["gates.png"] if (out_dir / "gates.png").exists() else []
            wrote += ["tensorboard/"] if args.report_to == "tensorboard" else []
            print("wrote " + ", ".join(f"{out_dir}/{w}" for w in wrote))
        world.barrier()
    finally:
        # the group this job started (a DeepSpeed job of one process has one of one rank) or
        # joined under torchrun
        if dist.is_initialized() and (started or world.size > 1):
            import gc

            # the job's objects (model wrappers, optimizer, gloo work handles) can sit in
            # reference cycles; left to interpreter shutdown, gloo's threads may be torn down
            # after Python and abort the rank (SIGABRT at the end of finished jobs, seen in
            # loaded test runs): free them while the interpreter is whole
            gc.collect()
            dist.destroy_process_group()
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from snr_dist import bundled
    from snr_dist.experiments.config import ConfigError
    from snr_dist.experiments.study import load_study

    path = Path(args.name)
    if not path.suffix:
        path = Path(args.configs) / f"{args.name}.yaml"
        if not path.is_file() and args.configs == "configs/experiments":
            path = bundled.resolve(args.name, "experiments")
    if not path.is_file():
        known = sorted(p.stem for p in Path(args.configs).glob("*.yaml")) or bundled.names(
            "experiments"
        )
        print(
            f"snr-dist: no experiment {args.name!r} ({path} not found); known: {known}",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = load_study(path, args.set, smoke=args.smoke)
    except ConfigError as e:
        print(f"snr-dist: {e}", file=sys.stderr)
        return 2
    if args.workers is not None:
        if args.workers < 1:
            print(f"snr-dist: --workers {args.workers}: allowed: an int >= 1", file=sys.stderr)
            return 2
        cfg = cfg.model_copy(update={"workers": args.workers})
    from snr_dist.experiments import study_report
    from snr_dist.experiments.study import all_jobs, run_study, select

    out_dir = Path(args.output_dir or cfg.output_dir) / cfg.name
    jobs = len(all_jobs(cfg))
    print(f"snr-dist {__version__}: experiment {cfg.name}: {jobs} runs -> {out_dir}/", flush=True)
    records = run_study(cfg, out_dir, progress=not args.no_progress, fresh=args.fresh)
    selected = select(cfg, records)
    total = sum(r["wall_s"] for r in records.values())
    command = "snr-dist " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if cfg.study == "label_noise_horizon":  # read at every horizon: a report of its own
        from snr_dist.experiments import horizon

        print(horizon.write(cfg, records, out_dir, command, total))
        print(f"wrote {out_dir}/report.md, {out_dir}/summary.json and its pictures")
        return 0
    print(study_report.write(cfg, selected, out_dir, command, total))
    print(f"wrote {out_dir}/report.md, {out_dir}/summary.json, {out_dir}/curves.png")
    return 0


def _entk(args: argparse.Namespace) -> int:
    from snr_dist.experiments.config import ConfigError
    from snr_dist.experiments.entk_run import load_entk_config

    try:
        cfg = load_entk_config(_config_path(args.config, "entk"), args.set)
    except ConfigError as e:
        print(f"snr-dist: {e}", file=sys.stderr)
        return 2
    from snr_dist.experiments.entk_run import run_entk

    out_dir = Path(args.output_dir or cfg.output_dir) / cfg.name
    print(f"snr-dist {__version__}: ENTK target spectrum {cfg.name} -> {out_dir}/", flush=True)
    try:
        run_entk(cfg, out_dir, progress=not args.no_progress)
    except ConfigError as e:  # what only the data can tell (the training split's size)
        print(f"snr-dist: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir}/entk.json, {out_dir}/entk.png")
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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
    train.add_argument(
        "--deepspeed",
        metavar="JSON",
        help="train through DeepSpeed with this config (ZeRO stage, dtype); the optimizers "
        "come from --config, and the JSON's snr_preconditioner block (if any) overrides the "
        "SNRAdamW options it names",
    )
    train.add_argument(
        "--report-to",
        choices=["none", "tensorboard"],
        default="none",
        help="also write TensorBoard event files (evaluations, SNR scalars per layer group, "
        "gate histograms) under OUTPUT/NAME/tensorboard/",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=_train)
    exp = sub.add_parser(
        "experiment",
        help="run a claim experiment (methods x lr grid x seeds) and write its report",
    )
    exp.add_argument(
        "name",
        help="an experiment in configs/experiments/ (e.g. label_noise) or a path to a study YAML",
    )
    exp.add_argument("--configs", default="configs/experiments", help=argparse.SUPPRESS)
    exp.add_argument(
        "--smoke",
        action="store_true",
        help="apply the config's 'smoke' overrides (a minute-long structural run)",
    )
    exp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key (repeatable)",
    )
    exp.add_argument("--workers", type=int, help="worker processes (default: the config's)")
    exp.add_argument("--output-dir", help="parent folder of the run (default: the config's)")
    exp.add_argument("--fresh", action="store_true", help="ignore finished runs and rerun all")
    exp.add_argument("--no-progress", action="store_true", help="no progress bars")
    exp.set_defaults(func=_experiment)
    entk = sub.add_parser(
        "entk", help="record where clean targets and label noise sit in the ENTK eigenbasis"
    )
    entk.add_argument("--config", required=True, help="YAML config, e.g. configs/entk/digits.yaml")
    entk.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override by dotted key"
    )
    entk.add_argument("--output-dir", help="parent folder of the run (default: the config's)")
    entk.add_argument("--no-progress", action="store_true", help="no progress bar")
    entk.set_defaults(func=_entk)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
