"""``sigmoid-moe compare``: the main job's command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

from sigmoid_moe._cli_args import checked, choice, integer, listed, output_dir, real, usage_errors
from sigmoid_moe.errors import NonFiniteError, Terminated, UsageError
from sigmoid_moe.sharding import MeshConfig

__all__ = ["add_compare_parser"]


def _data_flag(text: str) -> str:
    from sigmoid_moe.harness.data import parse_data_spec

    try:
        parse_data_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _mesh_flag(text: str) -> MeshConfig:
    try:
        return MeshConfig.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _job_flags(args: argparse.Namespace) -> None:
    """Checks the flags of a multi-process job (:mod:`sigmoid_moe.harness.multiprocess`)."""
    joining = args.coordinator is not None
    if joining != (args.process_id is not None):
        raise UsageError(
            "--process-id and --coordinator go together: each process of a multi-process job "
            "is started with both (e.g. --process-id 1 --coordinator host0:1234)."
        )
    if joining and not 0 <= args.process_id < args.num_processes:
        raise UsageError(
            f"--process-id {args.process_id} must be in [0, --num-processes {args.num_processes})."
        )
    if args.num_processes > 1:
        with usage_errors():
            args.mesh.local_devices(args.num_processes)


def _compare(args: argparse.Namespace) -> int:
    """Trains and reports in this process; with ``--num-processes N`` alone, starts N local
    processes of this command instead; with ``--process-id`` and ``--coordinator``, runs as
    that process of a multi-process job."""
    _job_flags(args)
    if args.coordinator is not None:
        return _in_job(args)
    if args.num_processes > 1:
        return _spawn_processes(args)
    return _run_compare(args)


def _in_job(args: argparse.Namespace) -> int:
    """This process's part of a multi-process job (:mod:`sigmoid_moe.harness.multiprocess`)."""
    from sigmoid_moe.harness import multiprocess

    multiprocess.initialize(args.process_id, args.num_processes, args.coordinator, args.mesh)
    try:
        code = _run_compare(args)
    except (UsageError, NonFiniteError, KeyboardInterrupt, Terminated):
        raise
    except BaseException:
        multiprocess.settle_failure()  # ends this process if a lost peer is the cause
        raise
    multiprocess.finished()
    return code


def _spawn_processes(args: argparse.Namespace) -> int:
    """Starts this command as ``--num-processes`` local processes that join one job."""
    from sigmoid_moe.harness.multiprocess import spawn

    def command(process_id: int, coordinator: str) -> list[str]:
        return [*args.relaunch, f"--process-id={process_id}", f"--coordinator={coordinator}"]

    return spawn(command, args.num_processes)


def _run_compare(args: argparse.Namespace) -> int:
    from sigmoid_moe.harness.compare import check_runs, compare
    from sigmoid_moe.harness.data import build_corpus
    from sigmoid_moe.harness.presets import PRESETS
    from sigmoid_moe.harness.report import results_table

    preset = PRESETS[args.preset]
    base = preset.base
    changes = {
        k: v
        for k, v in (
            ("steps", args.steps),
            ("batch_size", args.batch_size),
            ("grad_accum", args.grad_accum),
        )
        if v is not None
    }
    if "steps" in changes:
        changes["warmup_steps"] = min(base.warmup_steps, max(0, changes["steps"] // 10))
    if args.bias_rate_schedule:
        changes["bias_rate_schedule"] = args.bias_rate_schedule
    changes["mesh"] = args.mesh
    with usage_errors():
        if args.data:
            changes["data"] = dataclasses.replace(base.data, paths=tuple(args.data))
        base = dataclasses.replace(base, **changes)
        strategies = preset.strategies(
            bias_rates=args.bias_rates,
            rules=args.rules,
            aux_coefs=args.aux_coefs,
            scopes=args.balance_scope,
        )
        if args.strategy:
            names = [strategy.name for strategy in strategies]
            for name in args.strategy:
                if name not in names:
                    raise ValueError(
                        f"--strategy {name!r} is not one of this comparison's strategies: "
                        f"{', '.join(names)}."
                    )
            strategies = [s for s in strategies if s.name in args.strategy]
        seeds = check_runs(strategies, args.seeds or preset.seeds)
        corpus = build_corpus(base.data, base.model.seq_len)
    out = output_dir(args.out or f"runs/compare-{args.preset}")
    from sigmoid_moe.harness.distributed import is_writer
    from sigmoid_moe.harness.run_files import run_folder_lock

    try:
        with run_folder_lock(out, "--out") if is_writer() else contextlib.nullcontext():
            results = compare(
                base,
                strategies,
                out,
                seeds=seeds,
                preset=args.preset,
                jobs=args.jobs,
                resume=not args.no_resume,
                progress=not args.quiet,
                report=True,
                corpus=corpus,
                allow_data_change=args.allow_data_change,
            )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; the last checkpoints under {out}/runs are intact: run the same "
            "command again to resume."
        )
        return 130
    if is_writer():
        print()
        print(results_table(results))
        print(f"report: {out / 'report.md'}")
    return 0


def add_compare_parser(sub) -> argparse.ArgumentParser:
    """Adds ``compare`` to the ``sigmoid-moe`` subparsers."""
    from sigmoid_moe._rate_schedule import RATE_SCHEDULE_FORMS, check_rate_schedule
    from sigmoid_moe.balancing import BIAS_RULES
    from sigmoid_moe.harness.model import BALANCE_SCOPES
    from sigmoid_moe.harness.presets import PRESETS

    rates = listed(real(positive=True), "numbers", "1e-3,1e-2")
    p = sub.add_parser(
        "compare",
        help="train a small MoE LM under each balancing strategy and report balance and loss",
        description=(
            "Trains one small byte-level MoE LM per strategy (softmax+aux, sigmoid+aux, "
            "sigmoid+loss-free bias, no balancing) and writes report.md, plots and "
            "results.json to --out."
        ),
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--out", help="output folder (default runs/compare-<preset>)")
    p.add_argument(
        "--data",
        nargs="+",
        type=_data_flag,
        metavar="[DOMAIN=]PATH",
        help="text files or folders instead of the built-in corpus (default domain: user)",
    )
    p.add_argument("--steps", type=integer(1), help="override the preset's training steps")
    p.add_argument("--batch-size", type=integer(1), help="override the preset's sequences per step")
    p.add_argument(
        "--seeds",
        type=listed(integer(0), "seeds", "0,1,2"),
        help="training seeds, every strategy runs once per seed (default: the preset's)",
    )
    p.add_argument(
        "--jobs",
        type=integer(1),
        help="worker processes to spread the runs over (default: one per CPU core); the "
        "numbers do not depend on it",
    )
    p.add_argument(
        "--mesh",
        type=_mesh_flag,
        default=MeshConfig(),
        metavar="data=D,expert=E",
        help="train every run on a D x E device mesh (data parallel x expert parallel); on "
        "CPU the devices are simulated, one worker process per run",
    )
    p.add_argument(
        "--num-processes",
        type=integer(1),
        default=1,
        help="run as this many processes joined into one --mesh: alone, as local processes "
        "(gloo on 127.0.0.1); with --process-id and --coordinator, as that process of a "
        "multi-host job (see sigmoid_moe/harness/multiprocess.py)",
    )
    p.add_argument(
        "--process-id",
        type=integer(0),
        help="this process's index in a multi-process job (with --coordinator)",
    )
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="process 0's address in a multi-process job (with --process-id)",
    )
    p.add_argument(
        "--grad-accum",
        type=integer(1),
        help="micro-batches per optimizer step (must divide the batch size)",
    )
    p.add_argument(
        "--balance-scope",
        type=listed(choice(BALANCE_SCOPES, "scope"), "scopes", "global,micro,sequence"),
        help="tokens the balance statistics (bias and aux loss) are taken over: global (the "
        "whole step), micro (each micro-batch), sequence; several run side by side",
    )
    p.add_argument("--bias-rates", type=rates, help="loss-free rates, e.g. 1e-3,1e-2")
    p.add_argument(
        "--rules",
        type=listed(choice(BIAS_RULES, "rule"), "rules", "sign,proportional"),
        help=f"bias rules, from {', '.join(BIAS_RULES)}",
    )
    p.add_argument(
        "--bias-rate-schedule",
        type=checked(check_rate_schedule),
        metavar="SCHEDULE",
        help=f"how the bias rate changes over training: {RATE_SCHEDULE_FORMS} (cosine decays to 0)",
    )
    p.add_argument("--aux-coefs", type=rates, help="aux-loss coefficients, e.g. 1e-3,1e-2")
    p.add_argument(
        "--strategy",
        action="append",
        metavar="NAME",
        help="run only this strategy of the comparison (repeatable), e.g. "
        "'sigmoid+lossfree(0.001,sign)'",
    )
    p.add_argument("--no-resume", action="store_true", help="retrain runs that have checkpoints")
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="resume runs even though the training data differ from their data.json",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_compare)
    return p
