"""The ``lifelong`` command: replay, show, plot, checkout, inspect, and listings.

Every failure the user can cause (bad stream file, unknown editor, bad option,
unsupported model) is a ``streams.errors.UserError`` and ends in one line
``lifelong: error: ...`` and exit status 2, as does an ``OSError`` of the file system
(permission denied, disk full: the message names the path). Any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path

from lifelong.core.durable import writing
from lifelong.export import EXPORT_HELP
from streams.errors import UserError

THREADS_HELP = (
    "compute threads (default: $LIFELONG_THREADS, else OMP_NUM_THREADS if set, else the usable cores "
    "shared among the lifelong runs alive on this machine)"
)


def _parse_set(values: list[str]) -> dict[str, str]:
    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got '{item}'")
        out[key.strip()] = value.strip()
    return out


def _default_out(args) -> Path:
    stream = Path(args.stream).stem if args.stream.endswith(".jsonl") else args.stream
    model = Path(args.model).name if Path(args.model).is_dir() else args.model
    preset = "-" + re.sub(r"[^A-Za-z0-9@.-]+", "_", args.preset) if getattr(args, "preset", None) else ""
    return Path("runs") / f"{model}-{args.editor}-{stream}-seed{args.seed}{preset}"


@contextmanager
def quiet_bars(quiet: bool):
    """With ``quiet``, no progress bar at all, the one-time ones (key statistics, θ0 probes) too: tqdm
    reads its defaults from TQDM_* variables. The variable is restored afterwards."""
    saved = os.environ.get("TQDM_DISABLE")
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved


def check_replay_args(args) -> None:
    """What can be refused before torch and transformers are imported (a typo ends in a second, not
    after a minute of loading): names, numbers, the stream's spelling and whether its file exists."""
    from lifelong.core.names import unavailable_device, unknown_editor, unknown_model, unknown_probe

    problem = (
        unknown_model(args.model)
        or unavailable_device(args.device)
        or unknown_editor(args.editor)
        or next(filter(None, map(unknown_probe, args.probe or [])), None)
    )
    if problem:
        raise UserError(problem)
    from lifelong.run import RunConfig
    from lifelong.settings import check_values

    check_values(RunConfig, vars(args))
    from lifelong.core.names import unknown_setting
    from lifelong.core.options import quick_setting_problem

    for key, raw in _parse_set(args.set).items():
        problem = unknown_setting(args.editor, key) or quick_setting_problem(args.editor, key, raw)
        if problem:
            raise UserError(problem)
    from lifelong.core.keep import KeepPolicy

    KeepPolicy.parse(args.keep_deltas)
    from lifelong.export import check_export_spec

    for spec in args.export or []:
        check_export_spec(spec)
    from streams.catalog import check_stream_spec

    check_stream_spec(args.stream)


def cmd_replay(args) -> int:
    check_replay_args(args)
    from lifelong.core.bars import phase

    with quiet_bars(args.quiet), phase("starting: importing torch and transformers"):
        from lifelong.replay import replay  # seconds on a busy machine: said, not waited on without a word
    from lifelong.run import RUN_SETTINGS, RunConfig

    config = RunConfig(
        **{s.name: getattr(args, s.name) for s in RUN_SETTINGS if s.form == "flag"},
        editor_overrides=_parse_set(args.set),
        probes=list(args.probe or []),
    )
    out = Path(args.out) if args.out else _default_out(args)
    from lifelong.export import make_exporter

    exporters = [make_exporter(spec) for spec in args.export or []]
    try:
        with quiet_bars(args.quiet):
            result = replay(
                config,
                out,
                progress=not args.quiet,
                threads=args.threads,
                exporters=exporters,
                references_from=args.references_from,
            )
    finally:
        for exporter in exporters:
            exporter.close()
    if result.sequences is not None:  # a preset of independent sequences (wise-t): a directory of runs
        from lifelong.presets import format_sequence_figures

        print(format_sequence_figures(result.sequences))
        print(f"\nruns: {out.resolve()}/sequence_*  (figures: {out.resolve()}/preset.json)")
        return 0
    if result.run.completed_step() < result.total_steps:
        print(f"stopped at step {result.run.completed_step()} of {result.total_steps}; re-run to resume")
        return 0
    with quiet_bars(args.quiet), phase("writing the plots and the summary"):
        from lifelong.plots import plot_run  # matplotlib: imported only now, after the run
        from lifelong.summary import format_summary

        with writing(result.run.plots_dir):  # a full disk: one error naming the directory
            plots = plot_run(result.run)
        summary = format_summary(result.run)
    print(summary)
    print(f"\nrun directory: {result.run.path.resolve()}")
    print(f"plots: {', '.join(str(p.resolve()) for p in plots)}")
    return 0


def cmd_sweep(args) -> int:
    from lifelong.sweep import format_sweep, load_spec, run_sweep

    spec = load_spec(args.spec)  # a bad spec is refused here, before anything is written
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    with quiet_bars(args.quiet):
        result = run_sweep(spec, args.out, address=args.address, workers=args.workers, progress=not args.quiet)
    print(format_sweep(result.dir.path))
    counts = result.counts()
    print(f"\nsweep directory: {result.dir.path.resolve()}  (results.parquet, sweep.json, cells/)")
    if counts["failed"] or counts["pending"]:
        print(f"{counts['failed']} cell(s) failed, {counts['pending']} pending; re-run the same command to retry them")
        return 1
    return 0


def expand_sweeps(dirs: list[str]) -> list[str]:
    """Run directories, a sweep directory standing for its done cells."""
    from lifelong.sweep import SweepDir, is_sweep_dir

    out = []
    for d in dirs:
        if is_sweep_dir(d):
            runs = SweepDir(d).runs()
            if not runs:
                raise UserError(f"{d}: no cell of this sweep is done yet")
            out += [str(r.path) for r in runs]
        else:
            out.append(d)
    return out


def cmd_show(args) -> int:
    from lifelong.summary import format_summary, summary_json
    from lifelong.sweep import format_sweep, is_sweep_dir

    if is_sweep_dir(args.dir):
        if args.json or args.output_path or args.step is not None:
            raise UserError(
                f"{args.dir} is a sweep: show --json, --output-path and --step take one of its cells (DIR/cells/NAME)"
            )
        print(format_sweep(args.dir))
    elif args.json or args.output_path:
        text = json.dumps(summary_json(_run_at(args.dir, args.step)), indent=1, default=str)
        if args.output_path:
            from lifelong.run import atomic_write_text

            target = Path(args.output_path)
            if target.is_dir():
                raise UserError(f"--output-path {target} is a directory; give a file name")
            atomic_write_text(target, text + "\n")
        print(text)
    else:
        print(format_summary(_run_at(args.dir, args.step)))
    return 0


def _run_at(path, step: int | None):
    """The run directory, or a read-only view of it as it stood after ``step`` (``--step``)."""
    from lifelong.run import RunAsOf, RunDir

    return RunDir(path) if step is None else RunAsOf(path, step)


def _writable(directory: Path) -> Path:
    """``directory``, refused in one line when the nearest existing part of it cannot be written."""
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise UserError(f"{existing} is not writable: write the plots elsewhere with --out DIR")
    return directory


def cmd_plot(args) -> int:
    from lifelong.plots import plot_compare, plot_run
    from lifelong.run import RunDir
    from lifelong.sweep import is_sweep_dir

    if is_sweep_dir(args.dir):
        dirs = expand_sweeps([args.dir])
        out = Path(args.out) if args.out else Path(args.dir) / "plots"
        for d in dirs:
            for path in plot_run(RunDir(d), _writable(out / Path(d).name if args.out else RunDir(d).plots_dir)):
                print(path)
        if len(dirs) > 1:
            print(plot_compare([RunDir(d) for d in dirs], _writable(out) / "compare.png"))
        return 0
    run = RunDir(args.dir)
    run.manifest()  # a one-line error for a directory that is not a run
    for path in plot_run(run, _writable(Path(args.out) if args.out else run.plots_dir)):
        print(path)
    return 0


def cmd_compare(args) -> int:
    from lifelong.plots import plot_compare, run_labels
    from lifelong.summary import compare_table, configuration_labels, configurations, format_table, group_note

    dirs = expand_sweeps(args.dirs)
    if len(dirs) < 2:
        raise UserError("compare needs at least two run directories (or a sweep directory with two done cells)")
    runs = [_run_at(d, args.step) for d in dirs]
    for run in runs:
        run.manifest()  # a one-line error for a directory that is not a run
        if run.completed_step() < 1:
            raise UserError(
                f"{run.path}: no edit step of this run is complete yet, so there is nothing to compare; "
                "resume it with its replay command first"
            )
    labels = run_labels(runs)
    out = Path(args.out)
    table = compare_table(runs, labels)
    out.mkdir(parents=True, exist_ok=True)
    with writing(out / "compare.csv"):
        table.write_csv(out / "compare.csv")
    figure = plot_compare(runs, out / "compare.png")
    for key, what in (
        ("stream_hash", "replayed different streams"),
        ("model", "edited different models"),
        ("probes", "ran different probes"),
    ):
        if len({json.dumps(r.manifest()["identity"].get(key), sort_keys=True) for r in runs}) > 1:
            print(f"note: the runs {what}; their figures are not directly comparable")
    for label, group in zip(configuration_labels(runs, configurations(runs)), configurations(runs)):
        if len(group) > 1:
            seeds = ", ".join(str(runs[i].manifest()["identity"]["seed"]) for i in group)
            print(
                f"{label}: {len(group)} runs differ only in seed ({seeds}): 'pooled' = their items as one "
                "sample (Wilson/bootstrap, rates over items only); 'seed mean' = mean over seeds ± 95% t "
                "interval, n = seeds"
            )
            note = group_note(runs, group)
            if note:
                print(f"{label}: {note}")
    print(format_table(table))
    print(
        "\neach cell: value [95% interval] n; intervals over items: Wilson for 0/1 outcomes, bootstrap "
        "(2,000 resamples, seeded) for continuous values"
    )
    print(f"\ntable: {(out / 'compare.csv').resolve()}\nfigure: {figure.resolve()}")
    return 0


def cmd_checkout(args) -> int:
    from lifelong.core.models import check_checkout_target, save_model_dir
    from lifelong.replay import checkout
    from lifelong.run import RunDir

    if (args.step is None) == (args.at is None):
        raise UserError("checkout needs exactly one of --step K or --at TIME")
    check_checkout_target(Path(args.out))
    step = args.step
    if args.at is not None:
        try:
            when = datetime.fromisoformat(args.at)
        except ValueError:
            raise UserError(f"--at {args.at!r}: expected an ISO time such as 2024-05-01T12:00") from None
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
        step = RunDir(args.dir).step_at(when)
    lm = checkout(args.dir, step, args.device)
    if lm.editor is not None and lm.editor.adaptor:
        raise UserError(
            f"editor '{lm.editor.name}' keeps its edits outside the weights (adaptor/memory state), "
            "which a transformers directory cannot hold; use lifelong.replay.checkout in Python"
        )
    check_checkout_target(Path(args.out))  # again: it may have changed while the model was rebuilt
    save_model_dir(lm.model, lm.tokenizer, Path(args.out), marker=f"step {step} of {Path(args.dir).resolve()}\n")
    print(f"step {step} of {args.dir} written to {Path(args.out).resolve()}")
    return 0


def cmd_export(args) -> int:
    from lifelong.export import export_run

    count = export_run(args.dir, args.to)
    print(f"{count} step-level figures of {args.dir} written to {args.to}")
    return 0


def cmd_judge(args) -> int:
    from lifelong.judging import describe, judge_run
    from lifelong.run import RunDir
    from probes.judge import ChatJudge

    judge = ChatJudge.from_environment(args.judge, args.judge_model, timeout=args.timeout, retries=args.retries)
    report = judge_run(RunDir(args.dir), judge, workers=args.workers, progress=not args.quiet)
    print(describe(RunDir(args.dir), report, judge.name))
    return 0


def cmd_inspect(args) -> int:
    for flag, value in (("--tokens", args.tokens), ("--edits", args.edits)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    from lifelong.inspect import before_after, format_before_after

    chosen, rows, _ = before_after(
        args.dir,
        edit_ids=args.edit or None,
        count=args.edits,
        tokens=args.tokens,
        device=args.device,
        stream=args.stream,
    )
    print(format_before_after(chosen, rows))
    return 0


def cmd_train_mend(args) -> int:
    from lifelong.editors import mend

    given = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "rank": args.rank,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
        "holdout": args.holdout,
        "eval_every": args.eval_every,
        "patience": args.patience,
        "stop_key": args.stop_key,
    }
    return _train_hypernetwork(args, mend, given, "MEND")


def cmd_train_rledit(args) -> int:
    from lifelong.editors import rledit

    given = {
        "steps": args.steps,
        "epochs": args.epochs,
        "num_seq": args.num_seq,
        "n_edits": args.n_edits,
        "rank": args.rank,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
        "holdout": args.holdout,
        "eval_every": args.eval_every,
        "patience": args.patience,
        "stop_key": args.stop_key,
    }
    return _train_hypernetwork(args, rledit, given, "RLEdit")


def _train_hypernetwork(args, method, given: dict, label: str) -> int:
    """Train (or resume) a hypernetwork editor's network: ``method`` is its package (mend or rledit, each
    with resolve_layers, resolve_params, training_preset, train_hypernetwork, load_hypernetwork,
    format_curve and training_summary); ``given`` the training settings set on the command line."""
    from lifelong.core.machine import ComputeThreads, thread_policy
    from lifelong.core.models import load_model
    from lifelong.editors.mend import read_curve

    policy = thread_policy(args.threads)
    with quiet_bars(args.quiet):
        lm = load_model(args.model, args.device)
    layers = method.resolve_layers(args.layers or "", lm.num_layers)
    kinds = method.resolve_params(args.params or "", lm.adapter)
    config = method.training_preset(args.training, **{k: v for k, v in given.items() if v is not None})
    with ComputeThreads(policy), quiet_bars(args.quiet):
        path = method.train_hypernetwork(
            lm, layers, args.data, config, params=kinds, directory=args.out, limit=args.limit, progress=not args.quiet
        )
    curve = read_curve(path.parent / "curve.csv")
    if curve:
        print(f"learning curve ({path.parent / 'curve.csv'}; losses averaged since the previous evaluation):")
        print(method.format_curve(curve))
    if not path.is_file():
        print(f"training stopped before its end; run the same command again to resume ({path.parent})")
        return 0
    _, meta = method.load_hypernetwork(path, lm.device)
    records = f", {len(meta['train_ids'])} training records" if "train_ids" in meta else ""
    print(
        f"{label} hypernetwork for {args.model} layers {','.join(map(str, layers))}, params {','.join(kinds)}: "
        f"{meta['steps']} steps, {meta['seconds']:.0f} s of training{records}"
        f"\n{method.training_summary(meta)}\n{path.resolve()}"
    )
    return 0


def field_notes(cls: type) -> dict[str, str]:
    """What each field of a dataclass means, from its source: the field's trailing ``# comment``, else
    the comment block right above it; a subclass's note wins over its bases'."""
    import inspect
    import textwrap

    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            # dedented: a class nested in a probe (``Probe.Options``) has its fields one level deeper
            lines = textwrap.dedent(inspect.getsource(klass)).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines:
            text = line.strip()
            if text.startswith("#"):
                above.append(text.lstrip("#").strip())
                continue
            name, sep, rest = text.partition(":")
            if sep and name.isidentifier() and line.startswith("    ") and not line.startswith("     "):
                code, hash_, comment = rest.partition("  # ")
                note = comment.strip() if hash_ else " ".join(above)
                if note:
                    notes[name] = note
            above = []
    return notes


def _setting_lines(cls: type, indent: str, prefix: str = "") -> list[str]:
    """One line per field of ``cls``: ``prefix``name=default, its type and declared range, and its source comment."""
    from lifelong.core.options import range_text

    notes = field_notes(cls)
    lines = []
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kind += f", {range_text(f.name)}" if range_text(f.name) else ""
        note = notes.get(f.name, "")
        lines.append(f"{indent}{prefix}{f.name}={f.default!r}  [{kind}]" + (f"  {note}" if note else ""))
    return lines


def _listed(kind: str, names: list[str], asked: list[str]) -> list[str]:
    """The names a listing shows: those ``asked`` for (each refused in one line when unknown), else all."""
    from lifelong.core.names import did_you_mean

    unknown = [n for n in asked if n not in names]
    if unknown:
        hint = did_you_mean(unknown[0], names)
        raise UserError(f"unknown {kind} '{unknown[0]}'{hint}: expected one of {', '.join(names)}")
    return asked or names


def cmd_editors(args) -> int:
    from lifelong.core.names import installed_editors
    from lifelong.editors import EDITORS, editor_class

    for name in _listed("editor", sorted({*EDITORS, *installed_editors()}), args.names):
        cls = editor_class(name)
        print(f"{name:<11} {cls.description}")
        print("\n".join(_setting_lines(cls.Params, " " * 12, "--set ")))
    return 0


def cmd_streams(args) -> int:
    from streams import list_streams
    from streams.readers import DATASETS, default_data_dir

    data = default_data_dir()
    rows = list_streams() + [("PATH.jsonl", "a stream file in the JSONL format of streams/FORMAT.md")]
    width = max(len(name) for name, _ in rows) + 2
    for name, description in rows:
        dataset = DATASETS.get(name.removeprefix("dataset:")) if name.startswith("dataset:") else None
        if dataset is not None:
            present = (data / dataset[0]).is_file()
            description = f"{dataset[0]} ({'present' if present else 'absent'} in {data})"
        print(f"{name:<{width}}{description}")
    return 0


def cmd_probes(args) -> int:
    from lifelong.core.names import installed_probes
    from probes import PROBES, probe_class

    for name in _listed("probe", sorted({*PROBES, *installed_probes()}), args.names):
        cls = probe_class(name)
        print(f"{name:<14}{cls.description}" + ("" if name in PROBES else "  (installed)"))
        schedule = cls.default_schedule
        if name == "retention":
            schedule += " (a replay uses every:K from --probe-every)"
        print(f"{'':<14}schedule={schedule}")
        print("\n".join(_setting_lines(cls.Options, " " * 14)))
    return 0


def cmd_models(args) -> int:
    from lifelong.core.models import available_models

    for name, description in available_models():
        print(f"{name:<14}{description}")
    return 0


class _Parser(argparse.ArgumentParser):
    """The top-level parser, which also holds the ``replay`` subcommand's (see ``replay_parser`` below)."""

    replay_parser: argparse.ArgumentParser


def build_parser() -> _Parser:
    parser = _Parser(prog="lifelong", description="Sequential lifelong knowledge-editing simulator")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter  # every --help shows each option's default

    p = sub.add_parser(
        "replay", formatter_class=defaults, help="replay an edit stream through an editor, probing after each step"
    )
    from lifelong.run import RUN_SETTINGS

    for setting in RUN_SETTINGS:  # the declared settings (lifelong/run.py, lifelong/settings.py)
        if setting.form == "flag":
            p.add_argument(
                setting.flag, type=setting.kind, default=setting.default, choices=setting.choices, help=setting.meaning
            )
    p.add_argument("--out", default=None, help="run directory (default: runs/MODEL-EDITOR-STREAM-seedS)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="editor hyperparameter override")
    p.add_argument(
        "--probe",
        action="append",
        metavar="NAME[:KEY=VALUE,...]",
        help="an extra probe (see 'lifelong probes'), e.g. perplexity:schedule=every:5",
    )
    p.add_argument("--threads", default=None, metavar="N", help=THREADS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--references-from",
        default=None,
        metavar="RUN",
        help="copy step 0 (θ0's references, rows, generated answers) from this finished run of the same stream, "
        "model and probes with another editor, instead of computing it; refused with a note when they differ",
    )
    p.add_argument(
        "--export", action="append", metavar="SPEC", help=f"stream step-level figures to a tracker: {EXPORT_HELP}"
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="options from a TOML file, or a run's manifest.json (or run directory) to repeat that run; "
        "options given here win, --set adds to the file's settings",
    )
    p.set_defaults(func=cmd_replay)
    parser.replay_parser = p  # main() reads which options a command line gave (they win over --config)

    p = sub.add_parser(
        "sweep",
        formatter_class=defaults,
        help="run every combination of a TOML spec (editors x streams x seeds x settings) on Ray",
    )
    p.add_argument("spec", metavar="SPEC.toml", help="the sweep spec (see docs/SWEEPS.md)")
    p.add_argument("--out", required=True, help="sweep directory (re-run the same command to resume it)")
    p.add_argument(
        "--address",
        default=None,
        help="an existing Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: a local Ray "
        "instance sized to this machine)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="cells at once (default: one per CPU of the cluster, one per GPU with device cuda)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("show", help="print a run's summary table (a sweep's: one line per cell, mean over seeds)")
    p.add_argument("dir")
    p.add_argument(
        "--json",
        action="store_true",
        help="the summary as JSON (results with n and 95%% intervals, config, versions, machine)",
    )
    p.add_argument("--step", type=int, default=None, help="the run as it stood after this step (default: now)")
    p.add_argument(
        "--output-path", default=None, metavar="FILE", help="also write the JSON record to FILE (implies --json)"
    )
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "plot", help="write a run's PNGs under DIR/plots/ (a sweep's: each done cell's, and compare.png)"
    )
    p.add_argument("dir")
    p.add_argument("--out", default=None, help="write them here instead (e.g. for a read-only run)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "compare", formatter_class=defaults, help="overlay several runs (editors on one stream): one figure, one table"
    )
    p.add_argument(
        "dirs", nargs="+", metavar="DIR", help="run directories; a sweep directory stands for its done cells"
    )
    p.add_argument("--out", default="compare", help="where compare.png and compare.csv go (default: ./compare)")
    p.add_argument(
        "--step", type=int, default=None, help="every run as it stood after this step (runs of different lengths)"
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "checkout", formatter_class=defaults, help="write the model at a step as a transformers directory"
    )
    p.add_argument("dir")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--at", default=None, help="ISO time: the last step at or before it")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_checkout)

    p = sub.add_parser("export", formatter_class=defaults, help="write a run's step-level figures to a tracker")
    p.add_argument("dir")
    p.add_argument("--to", required=True, metavar="SPEC", help=EXPORT_HELP)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "judge",
        help="grade a run's stored generated answers with an LLM judge (any OpenAI-compatible chat endpoint; "
        "the Mirage paper's prompt): protocol gen_judge@SETTING, resumable",
    )
    p.add_argument("dir")
    p.add_argument("--judge", metavar="URL", default=None, help="the API's base URL (default: $LIFELONG_JUDGE_URL)")
    p.add_argument(
        "--judge-model",
        default=None,
        help="the judge model (default: $LIFELONG_JUDGE_MODEL, else gpt-4o-mini, the authors'); the API key is "
        "read from $LIFELONG_JUDGE_KEY, else $OPENAI_API_KEY (never from the command line, which others can see)",
    )
    p.add_argument("--workers", type=int, default=1, help="requests at a time (default: 1)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one reply (default: 60)")
    p.add_argument(
        "--retries", type=int, default=5, help="retries of a 429, 5xx or timed-out request, with backoff (default: 5)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser(
        "inspect",
        formatter_class=defaults,
        help="before/after: greedy continuations of a few edits' prompt, paraphrase and neighbour "
        "at θ0, after the edit and at the last step",
    )
    p.add_argument("dir")
    p.add_argument("--edits", type=int, default=3, help="how many edits, spread over the run")
    p.add_argument("--edit", action="append", metavar="ID", help="an edit by id (repeatable; instead of --edits)")
    p.add_argument("--tokens", type=int, default=12, help="greedy tokens per continuation")
    p.add_argument("--stream", default=None, help="the run's stream file, where it is not at the recorded path")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "train-mend",
        formatter_class=defaults,
        help="train (or resume) MEND's hypernetwork; cached by model, layers, params and data",
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default=None, help="edited layers, e.g. 27-29 (default: the last three)")
    p.add_argument(
        "--params",
        default=None,
        help="edited MLP weights per layer, comma-separated gate, up, down (default: all; "
        "'down': the former down-only hypernetwork)",
    )
    p.add_argument(
        "--data",
        default="split:counterfact",
        help="training edits: comma-separated split:counterfact, split:zsre (a data set's training split, "
        "less its evaluated records' subjects) or streams (builtin, dataset:NAME, file.jsonl)",
    )
    p.add_argument(
        "--training",
        default="published",
        choices=["published", "cpu-small"],
        help="settings: published (EasyEdit's MEND training file for Llama: lr 1e-6, lr_lr 1e-4, rank 1920, "
        "1 edit x 10 accumulated, validation every 1000 steps, patience 30000, capped at 2000 steps) or "
        "cpu-small (the former: 150 steps of 4 edits, lr 1e-3, lr_lr 1e-2, rank 64, no early stopping); "
        "the options below override it",
    )
    _hypernetwork_training_args(p, "cap on training steps (iterations)", "rank of the hypernetwork's low-rank layers")
    p.add_argument("--batch-size", type=int, default=None, help="edits per training step")
    p.add_argument(
        "--holdout",
        type=int,
        default=None,
        help="keep the last N training records out, as the validation set (learning curve, early stopping)",
    )
    p.add_argument("--eval-every", type=int, default=None, help="steps between validations")
    p.add_argument(
        "--patience", type=int, default=None, help="stop after N steps without a better validation (0: never)"
    )
    p.add_argument(
        "--stop-key",
        default=None,
        choices=["es", "total", "nll"],
        help="validation score for early stopping: es (the toolkit's edit/acc_val) or total (the original's "
        "loss/total_edit_val)",
    )

    p.set_defaults(func=cmd_train_mend)

    p = sub.add_parser(
        "train-rledit",
        formatter_class=defaults,
        help="train (or resume) RLEdit's hypernetwork over edit sequences; cached by model, layers, params and data",
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default=None, help="edited layers (default: the nine before the last)")
    p.add_argument("--params", default=None, help="edited MLP projections, comma-separated (default: gate,up)")
    p.add_argument("--data", default="split:counterfact", help="training edits, as for train-mend")
    p.add_argument(
        "--training",
        default="published",
        choices=["published", "cpu-capped"],
        help="settings: published (the authors': one sequence of 400 steps of 20 edits, one Adam step, rank 1024) "
        "or cpu-capped (sequences of 8 steps of 5 edits, validated each epoch, stopped at a 3-epoch plateau "
        "of the validation NLL or 200 steps); "
        "the options below override it",
    )
    p.add_argument("--epochs", type=int, default=None, help="training sequences (one Adam step each)")
    p.add_argument("--num-seq", type=int, default=None, help="steps per training sequence")
    p.add_argument("--n-edits", type=int, default=None, help="edits per step")
    _hypernetwork_training_args(p, "cap on sequence steps (0: the whole schedule)", "rank of the hypernetwork's blocks")
    p.add_argument("--holdout", type=int, default=None, help="validation records (the last N), edited as a sequence")
    p.add_argument("--eval-every", type=int, default=None, help="epochs between validations")
    p.add_argument(
        "--patience", type=int, default=None, help="stop after N epochs without a better validation (0: never)"
    )
    p.add_argument("--stop-key", default=None, choices=["es", "nll"], help="validation score early stopping watches")

    p.set_defaults(func=cmd_train_rledit)

    for name, func, text in (
        ("editors", cmd_editors, "list editors and their hyperparameters (or only the NAMEs given)"),
        ("streams", cmd_streams, "list built-in streams"),
        ("probes", cmd_probes, "list probes and their options (or only the NAMEs given)"),
        ("models", cmd_models, "list models"),
    ):
        listing = sub.add_parser(name, help=text)
        listing.set_defaults(func=func)
        if name in ("editors", "probes"):
            listing.add_argument("names", nargs="*", metavar="NAME")
    return parser


def _hypernetwork_training_args(p: argparse.ArgumentParser, steps_help: str, rank_help: str) -> None:
    """The options train-mend and train-rledit share."""
    p.add_argument("--limit", type=int, default=None, help="use only the first N training records")
    p.add_argument("--steps", type=int, default=None, help=steps_help)
    p.add_argument("--rank", type=int, default=None, help=rank_help)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--out", default=None, help="directory (default: the cache, keyed by model, layers, params, data and settings)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", default=None, metavar="N", help=THREADS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options ``argv`` spells out (abbreviations included)."""
    names = parser._option_string_actions
    given = set()
    for token in argv:
        if token.startswith("--"):
            option = token.split("=", 1)[0]
            matches = [a for name, a in names.items() if name == option] or [
                a for name, a in names.items() if name.startswith(option)
            ]
            if len(matches) == 1:
                given.add(matches[0].dest)
    return given


def apply_config(args, parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Fill ``args`` from ``--config`` wherever the command line gave nothing."""
    from lifelong.config import read_config

    given = given_options(parser, argv)
    for key, value in read_config(args.config).items():
        if key == "set":
            args.set = list(value) + list(args.set or [])
        elif key not in given:
            setattr(args, key, value)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a kill, a job scheduler's stop), raised where the program is, as Ctrl-C would be."""


def _terminate(signum, frame) -> None:
    raise Terminated()


INTERRUPTED = (
    "\ninterrupted: completed steps (and key-statistics text sampled so far) are saved; "
    "re-run the same command to resume"
)


def _interrupted(stop: KeyboardInterrupt) -> int:
    print(INTERRUPTED, file=sys.stderr)
    return 143 if isinstance(stop, Terminated) else 130


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status. Called without ``argv`` (as the ``lifelong`` program),
    it ends the process itself once the command is done (see :func:`_end_program`)."""
    import threading

    program = argv is None and threading.current_thread() is threading.main_thread()
    try:
        try:
            code = _main(argv)
        except KeyboardInterrupt as stop:  # one that came while the handlers below ran
            code = _interrupted(stop)
        if program:
            _end_program(code)
    except KeyboardInterrupt as stop:  # while the program was ending
        code = _interrupted(stop)
        if program:
            _end_program(code)
    return code


def _end_program(code: int) -> None:
    """Flush the output, run the exit handlers and end the process now. The interpreter's own teardown
    (freeing torch, transformers and the model, seconds long) runs no Python code, so an interrupt
    arriving there would kill the process bare (exit -2, no 'interrupted' line): it is skipped. Files
    are all written and flushed to disk by then (lifelong.core.durable)."""
    import atexit
    import threading

    for thread in threading.enumerate():  # as the interpreter would: non-daemon threads finish first
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    import signal
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if getattr(args, "config", None):
            apply_config(args, parser.replay_parser, argv)
        return args.func(args)
    except KeyboardInterrupt as stop:
        return _interrupted(stop)
    except (UserError, OSError) as err:  # the user's input, or the user's file system (permissions, a full disk)
        print(f"lifelong: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    # Anything else is a bug (ours or an editor's): it propagates with its traceback, exit status 1.
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def one_line(text: str) -> str:
    """``text`` with what would break the one-line promise, or not print, escaped: line breaks and
    other control characters a user's input may carry, and lone surrogates (a non-UTF-8 byte in argv)."""
    return "".join(
        c
        if c.isprintable()
        else c.encode("unicode_escape", "backslashreplace").decode("ascii")
        if not 0xD800 <= ord(c) <= 0xDFFF
        else f"\\u{ord(c):04x}"
        for c in text
    )


if __name__ == "__main__":
    sys.exit(main())
