"""Command line: ``hf-weightforces SUBCOMMAND ...``, a thin layer over :mod:`hf_weightforces.analysis`.

    hf-weightforces fit PATH [--json] [--exclude-top N] [--groups-json FILE]
    hf-weightforces spline RUN_OR_CHECKPOINTS... [--json] [--sample N] [--lr ... schedule flags]
    hf-weightforces lambda RUN_OR_CHECKPOINTS... [--json] [--exact-groups]
    hf-weightforces report RUN_DIR [--out DIR]
    hf-weightforces run [--every N ...] -- python train.py ...   (the monitor on, no code change)

Each subcommand is a ``_add_<name>(subparsers)`` function that registers its arguments and sets
``func`` to a ``_run_<name>(args) -> int``; add new ones to :data:`_SUBCOMMANDS`.  Every option is
validated when parsed (ranges, finite numbers).  Bad input (unreadable checkpoint, bad grouping
file) exits with status 2 and one ``error: ...`` line on stderr naming the file and the cause, no
traceback; Ctrl-C exits with 130.  Progress goes to stderr (``--quiet`` silences it); names are
printed with control characters escaped (:mod:`hf_weightforces.cli_support`).  Only this module
prints.  Nothing heavy is imported before a ``_run_*`` function starts (``--help`` answers at once).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hf_weightforces.cli_support import ArgumentParser, add_common_flags, bounded_float, bounded_int, run_command

__all__ = ["build_parser", "main"]

_non_negative_int = bounded_int(0)
_positive_int = bounded_int(1)
_steps = bounded_int(0, 100_000_000)  # a schedule of this many steps is built in memory
_dpi = bounded_int(0, 600)  # 0: the style's own; 600 dpi is print quality already


def _load_grouping(file: str | None):
    """A :class:`~hf_weightforces.core.groups.Grouping` from ``{"class": ["regex", ...]}`` or
    ``{"patterns": {...}, "use_defaults": bool}``; raises ValueError with the file named."""
    from hf_weightforces.core.groups import Grouping

    if file is None:
        return None
    path = Path(file)
    if path.exists() and not path.is_file():
        raise ValueError(f"{file}: not a regular file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{file}: cannot read grouping JSON ({exc.strerror or exc})") from exc
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{file}: grouping JSON must be an object mapping class -> [regex, ...]")
    if "patterns" in data:
        patterns, use_defaults = data["patterns"], data.get("use_defaults", True)
    else:
        patterns, use_defaults = data, True
    if not isinstance(patterns, dict) or not isinstance(use_defaults, bool):
        raise ValueError(f"{file}: 'patterns' must be an object and 'use_defaults' a boolean")
    for cls, regexes in patterns.items():
        if not isinstance(regexes, list) or not all(isinstance(r, str) for r in regexes):
            raise ValueError(f"{file}: the patterns of {cls!r} must be a list of regex strings")
    try:
        return Grouping(patterns=patterns, use_defaults=use_defaults)
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from exc


def _add_fit(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit",
        help="Weibull fits of every weight matrix and per-group pooled fits of a checkpoint",
        description="Fit Weibull(k, lambda) to |w| of every weight matrix (docs/weibull.md protocol) "
        "of a model folder, Trainer checkpoint-N folder, .safetensors or .bin file.",
    )
    p.add_argument("path", help="model folder, checkpoint-N folder, .safetensors, .bin/.pt file or index .json")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument(
        "--exclude-top",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="drop the N largest magnitudes of each matrix (super weights) and report how k and lambda move",
    )
    p.add_argument(
        "--groups-json",
        metavar="FILE",
        help='JSON {"class": ["regex", ...]} overriding the weight classes (tried before the built-in rules)',
    )
    _hub_flags(p, several=False)
    p.set_defaults(func=_run_fit)


def _run_fit(args: argparse.Namespace) -> int:
    from hf_weightforces.analysis.fit import fit_checkpoint, format_table

    inputs = _hub_inputs(args, [args.path], need_steps=False)
    grouping = _load_grouping(args.groups_json)
    if isinstance(inputs, list):
        report = _something_fitted(fit_checkpoint(args.path, exclude_top=args.exclude_top, grouping=grouping))
        print(json.dumps(report.to_dict(), indent=2) if args.json else format_table(report))
        return 0
    reports = []
    for ck in inputs:  # one revision at a time
        report = _something_fitted(fit_checkpoint(ck.path, exclude_top=args.exclude_top, grouping=grouping))
        if args.json:
            reports.append({"revision": ck.label, **report.to_dict()})
        else:
            print(f"== {ck.label}\n{format_table(report)}\n")
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    return 0


def _something_fitted(report):
    """``report`` if it fitted a matrix; else ValueError naming the path and what was skipped (an
    empty table with status 0 would read as success)."""
    if report.matrices:
        return report
    reasons: dict[str, int] = {}
    for s in report.skipped:
        reasons[s.reason] = reasons.get(s.reason, 0) + 1
    detail = "; ".join(f"{n} {r}" for r, n in reasons.items())
    raise ValueError(f"{report.path}: no weight matrix to fit" + (f" (skipped: {detail})" if detail else ""))


def _add_geometry(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "geometry",
        help="trajectory geometry of a run's checkpoints: the backbone (with its random-walk null) and ranks",
        description="Backbone of the displacements between checkpoints (fraction, stability, interval |cos|, "
        "each beside its random-walk null) and per-layer stable/effective ranks and key-query rank "
        "collapse (docs/geometry.md), one row per checkpoint, with the live probes' keys.",
    )
    p.add_argument("paths", nargs="+", help="checkpoint-N folders, or run folders holding them")
    p.add_argument("--json", action="store_true", help="print the report (all keys) as JSON instead of a table")
    p.add_argument("--coords", type=_positive_int, default=1 << 16, metavar="N",
                   help="sampled coordinates per weight class (default 65536)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the coordinate sample (default 0)")
    p.add_argument("--no-ranks", action="store_true", help="skip the per-layer rank statistics")
    p.add_argument("--per-head", action="store_true", help="also report every head's key-query spectrum")
    p.add_argument("--num-heads", type=_positive_int, default=None, metavar="H",
                   help="attention heads (default: config.json of the last checkpoint)")
    p.add_argument("--layout", choices=("gpt_neox", "gpt2"), default=None,
                   help="fused QKV layout (default: from config.json's model_type)")
    p.add_argument("--groups-json", metavar="FILE",
                   help='JSON {"class": ["regex", ...]} overriding the weight classes (tried before the built-in rules)')
    _hub_flags(p)
    p.set_defaults(func=_run_geometry)


def _run_geometry(args: argparse.Namespace) -> int:
    from hf_weightforces.analysis.geometry import format_table, geometry_from_checkpoints

    report = geometry_from_checkpoints(
        _hub_inputs(args, args.paths), coords=args.coords, seed=args.seed, ranks=not args.no_ranks, per_head=args.per_head,
        num_heads=args.num_heads, layout=args.layout, grouping=_load_grouping(args.groups_json),
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_table(report))
    return 0


def _run_paths(p: argparse.ArgumentParser) -> None:
    """Arguments shared by the commands that read a run's checkpoints."""
    p.add_argument("--keep-every", type=_non_negative_int, default=0, metavar="N",
                   help="use only checkpoints whose step is a multiple of N (to try sparser spacings)")
    p.add_argument("--groups-json", metavar="FILE",
                   help='JSON {"class": ["regex", ...]} overriding the weight classes (tried before the built-in rules)')


def _hub_flags(p: argparse.ArgumentParser, *, several: bool = True) -> None:
    """Flags that turn a positional ``org/name`` into Hub revisions (``analysis/hub.py``)."""
    g = p.add_argument_group("Hub revisions (give a repository id such as EleutherAI/pythia-160m instead of paths)")
    g.add_argument("--revisions", metavar="SPEC",
                   help="comma list (step0,step1000) and/or START:STOP:STRIDE ranges (step1000:step143000:1000, "
                   "stop included); the step of each comes from its name" + ("" if several else "; default main"))
    g.add_argument("--delete-after", action="store_true",
                   help="remove each revision from the Hub cache once it has been read (disk holds one at a time)")
    g.add_argument("--cache-dir", metavar="DIR", help="Hub cache folder (default: HF_HUB_CACHE, else HF_HOME/hub)")


def _hub_inputs(args: argparse.Namespace, paths: list[str], *, need_steps: bool = True):
    """``paths`` as given, or :class:`~hf_weightforces.analysis.hub.HubCheckpoints` when they name a
    repository (with ``--revisions``, or ``main`` where ``need_steps`` is False)."""
    from hf_weightforces.analysis.hub import HubCheckpoints, looks_like_repo_id, parse_revisions

    repo = paths[0] if len(paths) == 1 and looks_like_repo_id(paths[0]) else None
    if args.revisions is None and repo is None:
        if args.delete_after:
            raise ValueError("--delete-after applies to Hub revisions (a repository id with --revisions)")
        return paths
    if repo is None:
        raise ValueError(f"--revisions needs one Hub repository id (org/name), got {' '.join(paths)}"
                         + (" (a local path)" if len(paths) == 1 else ""))
    if args.revisions is None and need_steps:
        raise ValueError(f"{repo}: no such local path; for a Hub repository give --revisions "
                         "(e.g. step1000:step143000:1000)")
    revisions = parse_revisions(args.revisions) if args.revisions else ["main"]
    source = HubCheckpoints(repo, revisions, delete_after=args.delete_after, cache_dir=args.cache_dir,
                            progress=None if getattr(args, "quiet", False) else lambda line: print(line, file=sys.stderr, flush=True),
                            need_steps=need_steps)
    args.__dict__.setdefault("hub_sources", []).append(source)  # main() closes it (removes the last one read)
    return source


def _schedule_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("schedule (only for runs without the callback's schedule.jsonl)")
    g.add_argument("--lr", type=bounded_float(0.0, math.inf, low_open=True), help="peak learning rate")
    g.add_argument("--total-steps", type=_steps, help="max_steps of the run (for the decay shape)")
    g.add_argument("--warmup-steps", type=_steps, default=0, help="linear warm-up steps (default 0)")
    g.add_argument("--lr-decay", choices=("constant", "linear", "cosine"), default="constant",
                   help="lr shape after warm-up, as the Trainer's lr_scheduler_type (default constant)")
    g.add_argument("--weight-decay", type=bounded_float(0.0, math.inf), default=None, help="AdamW weight decay of >= 2-D tensors (default 0)")
    g.add_argument("--ignore-record", action="store_true", help="use these flags even when the run has a record")
    g.add_argument("--preset", metavar="NAME", help="a published schedule (pythia-70m, pythia-160m, ...; inferred "
                   "from an EleutherAI/pythia-* repository id); --weight-decay, if given, overrides its decay")


def _flags_schedule(args: argparse.Namespace, paths=None):
    from hf_weightforces.analysis.records import schedule_from_flags

    preset = getattr(args, "preset", None)
    if preset is None and args.lr is None and getattr(paths, "repo_id", None):
        from hf_weightforces.analysis.presets import preset_for_repo

        preset = preset_for_repo(paths.repo_id)  # EleutherAI/pythia-* publish their schedule
    if preset is not None:
        from hf_weightforces.analysis.presets import get_preset

        if args.lr is not None:
            raise ValueError("--preset and --lr both give the schedule: choose one")
        wd = args.weight_decay  # None: the preset's own
        return get_preset(preset).schedule(weight_decay=wd)
    if args.lr is None:
        if args.ignore_record:
            raise ValueError("--ignore-record needs the schedule flags (--lr, --total-steps, ...)")
        return None
    if args.total_steps is None:
        raise ValueError("--lr needs --total-steps (the run's max_steps)")
    return schedule_from_flags(args.lr, args.total_steps, warmup_steps=args.warmup_steps, decay=args.lr_decay,
                               weight_decay=args.weight_decay or 0.0)


def _add_spline(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "spline",
        help="alignment force recovered from sparse checkpoints (spline displacement), with its accuracy",
        description="Fit a cubic spline through the checkpoints (on a seeded coordinate subsample) and estimate "
        "the alignment force A at every step between the first and last one: the paper's spline, the spline in "
        "lr-time, a corrected spline that puts back the injection it cannot see, the two-point baseline and "
        "two-point with interpolated w. Against the truth when the callback logged it (docs/spline.md).",
    )
    p.add_argument("paths", nargs="+", help="a Trainer output_dir with checkpoint-N folders, or checkpoints in step order")
    p.add_argument("--records", metavar="DIR", help="folder with metrics.jsonl / schedule.jsonl / params.json "
                   "(default: <run>/weightforces)")
    p.add_argument("--sample", type=_non_negative_int, default=1_000_000, metavar="N",
                   help="coordinates kept per checkpoint (default 1000000; 0: all)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the coordinate sample (default 0)")
    p.add_argument("--beta1", type=bounded_float(0.0, 1.0, high_open=True), help="Adam beta1 (default: params.json, else 0.9)")
    p.add_argument("--per-layer", action="store_true", help="also report every layer")
    p.add_argument("--per-matrix", action="store_true", help="also report every tensor")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    p.add_argument("--series", action="store_true", help="with --json: add every step's estimates")
    _run_paths(p)
    _hub_flags(p)
    _schedule_flags(p)
    p.set_defaults(func=_run_spline)


def _run_spline(args: argparse.Namespace) -> int:
    from hf_weightforces.analysis.spline import analyze, format_spline

    paths = _hub_inputs(args, args.paths)
    report = analyze(paths, records=args.records, flags_schedule=_flags_schedule(args, paths),
                     use_record=not args.ignore_record, sample_size=args.sample, seed=args.seed, beta1=args.beta1,
                     grouping=_load_grouping(args.groups_json), keep_every=args.keep_every,
                     per_layer=args.per_layer, per_matrix=args.per_matrix)
    if args.json:
        print(json.dumps(report.to_dict(args.series, args.per_layer, args.per_matrix), indent=2))
    else:
        print(format_spline(report, per_layer=args.per_layer, per_matrix=args.per_matrix))
    return 0


def _add_lambda(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lambda",
        help="Weibull k, lambda, sigma and lambda/sigma per group and per matrix over a run's checkpoints",
        description="Fit Weibull(k, lambda) to |w| (docs/weibull.md protocol) of every matrix and every group "
        "at every checkpoint, with the RMS sigma and lambda/sigma (docs/weibull.md), and predict lambda(t) from "
        "the run's forces (docs/offline.md). With --rule left --lock mean --alignment post on rows logged every "
        "step, the prediction is the research code's make_predicted_lambda_fig.py on the same forces and fits "
        "(at every record spacing N of --predict-every N); the defaults are the exact integration of every "
        "logged row and the live offset keys' k-lock ratio.",
    )
    p.add_argument("paths", nargs="+", help="a Trainer output_dir with checkpoint-N folders, or checkpoints in step order")
    p.add_argument("--exact-groups", action="store_true",
                   help="pool each group's magnitudes and sort them (exact; memory: the largest group) instead of "
                   "the histogram fit (within 1e-4 in k)")
    p.add_argument("--groups-only", action="store_true", help="leave out the per-matrix rows")
    p.add_argument("--json", action="store_true", help="print the fits as JSON instead of tables")
    p.add_argument("--records", metavar="DIR", help="the run's metrics.jsonl / schedule.jsonl folder for the "
                   "prediction from forces and lambda* (default: <run>/weightforces)")
    p.add_argument("--predict-every", type=_non_negative_int, default=0, metavar="N",
                   help="predict lambda(t) from the forces of every N-th step only (default 0: every logged row)")
    p.add_argument("--rule", choices=("right", "left"), default="right",
                   help="which row's force stands for the steps between two used rows: right (default) the row at "
                   "the interval's end, which holds the mean force over the steps since the previous row, so that "
                   "every logged row integrates every budget step exactly (the live offset keys integrate so too); "
                   "left the row at its start, the research code's forward-Euler rule (make_predicted_lambda_fig.py)")
    p.add_argument("--lock", choices=("start", "first", "mean"), default="start",
                   help="where the k-lock ratio lambda/sigma is taken: start (default) the run's start fit, the ratio "
                   "the live offset_*_klock keys use (logged as offset_klock_ratio; without live fits: first); "
                   "first the first fit at or after the first used row; mean the mean over every fit, the research "
                   "code's bridge (it uses the future). The output names the point and the ratio")
    p.add_argument("--alignment", choices=("w_t", "post"), default="w_t",
                   help="alignment integrated by the prediction: the exact A at w_t (default) or the research code's "
                   "align_post at w_{t+1}, the one its published offsets integrate (docs/budget.md, section 6); "
                   "its script's numbers need --rule left --lock mean as well")
    p.add_argument("--preset", metavar="NAME", help="published schedule for lambda* when the run has no record "
                   "(pythia-160m, ...; inferred from an EleutherAI/pythia-* repository id)")
    _run_paths(p)
    _hub_flags(p)

    p.set_defaults(func=_run_lambda)


def _run_lambda(args: argparse.Namespace) -> int:
    from hf_weightforces.analysis.dynamics import dynamics_of_run, format_dynamics
    from hf_weightforces.analysis.scale import format_scale, scale_trajectory

    paths = _hub_inputs(args, args.paths)
    traj = scale_trajectory(paths, grouping=_load_grouping(args.groups_json), exact_groups=args.exact_groups,
                            per_matrix=not args.groups_only, keep_every=args.keep_every)
    dyn, source = dynamics_of_run(paths, traj, records=args.records, preset=args.preset, every=args.predict_every,
                                  alignment=args.alignment, rule=args.rule, lock=args.lock)
    if args.json:
        from hf_weightforces.core.records import json_safe

        print(json.dumps({**traj.to_dict(), "schedule": source, "dynamics": json_safe(dyn)}, indent=2))
    else:
        print(format_scale(traj, per_matrix=not args.groups_only) + "\n\n" + format_dynamics(dyn, source))
    return 0


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="PNG figures of a run (forces, shares, balance, Weibull, layers, offsets, spline) and a summary",
        description="Draw the figures of a run trained with WeightForcesCallback from its metrics.jsonl and "
        "checkpoints, and write summary.md linking them.",
    )
    p.add_argument("run_dir", nargs="+", help="the Trainer output_dir (holding weightforces/metrics.jsonl); several: "
                   "overlay them (seeds, or an eta sweep when their peak lr differ) in --out "
                   "(default: weightforces-compare beside the first)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <run_dir>/weightforces/report)")
    p.add_argument("--no-checkpoints", action="store_true", help="do not read checkpoints (no offline fits, no spline)")
    p.add_argument("--sample", type=_non_negative_int, default=1_000_000, metavar="N",
                   help="coordinates kept per checkpoint for the spline (default 1000000; 0: all)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the coordinate sample (default 0)")
    p.add_argument("--keep-every", type=_non_negative_int, default=0, metavar="N",
                   help="use only checkpoints whose step is a multiple of N")
    p.add_argument("--dpi", type=_dpi, default=0, help="resolution of the PNG files (default: the style's)")
    p.add_argument("--style", choices=("default", "paper"), default="default",
                   help="figure size: default (screen) or paper (one journal column, 7 pt text, 300 dpi)")
    p.add_argument("--formats", default="png,pdf,svg", metavar="LIST",
                   help="files per figure, comma-separated from png, pdf, svg (default png,pdf,svg)")
    _schedule_flags(p)
    _hub_flags(p)
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from hf_weightforces.analysis.compare import compare_runs, write_run_dynamics
    from hf_weightforces.analysis.dynamics import run_dynamics
    from hf_weightforces.analysis.records import read_records
    from hf_weightforces.analysis.report import write_report

    source = _hub_inputs(args, args.run_dir)
    if not isinstance(source, list):  # Hub revisions: the checkpoint fits, lambda* (preset) and the phases
        from hf_weightforces.analysis.dynamics import dynamics_of_run, format_dynamics
        from hf_weightforces.analysis.scale import scale_trajectory

        traj = scale_trajectory(source, per_matrix=False)
        dyn, schedule = dynamics_of_run(source, traj, preset=args.preset)
        out = Path(args.out or f"weightforces-report-{source.repo_id.replace('/', '--')}")
        print(write_run_dynamics(dyn, out) or "skipped dynamics.png: fewer than two fitted revisions")
        print(format_dynamics(dyn, schedule))
        return 0
    if len(args.run_dir) > 1:
        comparison = compare_runs(args.run_dir, out_dir=args.out)
        for name in comparison.figures:
            print(comparison.out_dir / name)
        print(comparison.summary())
        return 0
    args.run_dir = args.run_dir[0]

    report = write_report(args.run_dir, out_dir=args.out, checkpoints=not args.no_checkpoints,
                          sample_size=args.sample, seed=args.seed, keep_every=args.keep_every,
                          flags_schedule=_flags_schedule(args), dpi=args.dpi or None, style=args.style,
                          formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()))
    for name in report.figures:
        print(report.out_dir / name)
    rec = read_records(args.run_dir)
    if rec.metrics:  # lambda(t) predicted from the forces, lambda* and the phases (analysis/dynamics.py)
        figure = write_run_dynamics(run_dynamics(None, rec.metrics, rec.schedule), report.out_dir)
        print(figure if figure else "skipped dynamics.png: no live Weibull fits in metrics.jsonl")
    for name, reason in report.skipped.items():
        print(f"skipped {name}: {reason}")
    print(report.summary)
    return 0


def _add_diagnose(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "diagnose",
        help="what is unusual about a model's weights, per class and per matrix, in plain words",
        description="Weibull fits (mid-80, mid-90, full), distribution-free shape metrics (Q90/Q10, P99.9/P50, "
        "Gini), Weibull vs lognormal vs gamma by KS and AIC, and a class of k for every weight matrix of a model "
        "folder, checkpoint, weights file or Hub repository (arXiv:2605.18898; docs/offline.md).",
    )
    p.add_argument("path", help="model folder, checkpoint-N folder, weights file, or a Hub repository id (org/name); "
                   "a run folder (a Trainer output_dir with the callback's weightforces/metrics.jsonl) first gets its "
                   "health verdicts (docs/health.md)")
    p.add_argument("--json", action="store_true", help="print every number as JSON instead of sentences")
    p.add_argument("--sample", type=_positive_int, default=1 << 16, metavar="N",
                   help="magnitudes per matrix for the maximum-likelihood family comparison (default 65536)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of that sample (default 0)")
    p.add_argument("--groups-json", metavar="FILE",
                   help='JSON {"class": ["regex", ...]} overriding the weight classes (tried before the built-in rules)')
    _hub_flags(p, several=False)
    p.set_defaults(func=_run_diagnose)


def _run_diagnose(args: argparse.Namespace) -> int:
    from hf_weightforces.analysis.diagnose import diagnose, format_diagnosis
    from hf_weightforces.analysis.run_health import run_health

    health = run_health(args.path)  # a run folder: its health verdicts from the records (docs/health.md)
    if health is not None and not health.has_weights:
        print(json.dumps(health.to_dict(), indent=2) if args.json else health.text())
        return 0
    inputs = _hub_inputs(args, [args.path], need_steps=False)
    grouping = _load_grouping(args.groups_json)
    items = [(args.path, None)] if isinstance(inputs, list) else [(None, ck) for ck in inputs]
    results = []
    for path, ck in items:  # Hub revisions one at a time
        d = diagnose(ck.path if ck is not None else path, label=ck.label if ck is not None else None,
                     grouping=grouping, sample=args.sample, seed=args.seed)
        if not d.matrices:  # "No matrix stands out" would read as a clean bill of health
            raise ValueError(f"{d.source}: no weight matrix to diagnose (skipped {d.skipped} tensor(s): not floating "
                             "point, or 1-D and small)")
        results.append(d.to_dict() if args.json else format_diagnosis(d))
    if health is not None:  # a run folder that also holds weights: the verdicts, then the weights
        results = [{"health": health.to_dict(), "weights": results[0]}] if args.json else [health.text(), *results]
    print(json.dumps(results[0] if len(results) == 1 else results, indent=2) if args.json else "\n\n".join(results))
    return 0


def _add_run(subparsers: argparse._SubParsersAction) -> None:
    """``run [--every N ...] -- COMMAND``: the zero-code switch as a launcher (integrations/launcher.py)."""
    from hf_weightforces.integrations.launcher import add_run_parser

    add_run_parser(subparsers)


def _add_wandb_view(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "wandb-view",
        help="save a W&B workspace with the panels a researcher wants first (forces, shares, balance, health, "
        "Weibull, offset, heat maps, geometry)",
        description="Build a saved W&B workspace for ENTITY/PROJECT from the keys a run logged: A, I, D per class, "
        "stacked shares, A + D balance, closure and rounding, Weibull k and lambda/sigma, the offset parts, the "
        "per-layer heat maps, the backbone and rank collapse beside their nulls, the report's figures.",
    )
    p.add_argument("project", metavar="ENTITY/PROJECT", help="where the workspace goes")
    p.add_argument("--run", metavar="ID", help="show this run only (and take the keys from it)")
    p.add_argument("--keys-from", metavar="RUN_DIR",
                   help="read the logged keys from a run's weightforces/wandb_keys.json instead of the W&B API")
    p.add_argument("--name", default="weight forces", help="the workspace's name (default 'weight forces')")
    p.add_argument("--dry-run", action="store_true",
                   help="print the workspace as JSON instead of saving it (no network; needs --keys-from)")
    p.set_defaults(func=_run_wandb_view)


def _run_wandb_view(args: argparse.Namespace) -> int:
    from hf_weightforces.integrations.wandb_view import (
        build_workspace,
        keys_from_api,
        keys_from_run_dir,
        view_sections,
        workspace_json,
    )

    entity, _, project = args.project.partition("/")
    if not entity or not project or "/" in project:
        raise ValueError(f"expected ENTITY/PROJECT, got {args.project!r}")
    if args.dry_run and not args.keys_from:
        raise ValueError("--dry-run needs --keys-from RUN_DIR (it reads no keys over the network)")
    keys = keys_from_run_dir(args.keys_from) if args.keys_from else keys_from_api(entity, project, args.run)
    if not view_sections(keys):
        raise ValueError("the run logged no weight-forces keys (train with WeightForcesCallback and report_to wandb)")
    workspace = build_workspace(entity, project, keys, run=args.run, name=args.name)
    if args.dry_run:
        print(workspace_json(workspace))
        return 0
    workspace.save()
    print(getattr(workspace, "url", None) or f"saved workspace {args.name!r} in {entity}/{project}")
    return 0


#: Registered subcommands, in help order.
_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_fit, _add_geometry, _add_spline, _add_lambda, _add_report, _add_diagnose, _add_run, _add_wandb_view,
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="hf-weightforces",
        description="AdamW force budgets and Weibull weight diagnostics for Hugging Face models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    for sub in subparsers.choices.values():
        add_common_flags(sub)  # --quiet, --traceback
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for bad input, with one ``error:`` line on stderr;
    130 after Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        return run_command(args.func, args)
    finally:
        for source in getattr(args, "hub_sources", ()):
            source.close()  # --delete-after: the last revision read leaves the cache too


if __name__ == "__main__":
    sys.exit(main())
