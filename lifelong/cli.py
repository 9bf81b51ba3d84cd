"""The ``lifelong`` command: replay, show, plot, checkout, and listings.

Every failure the user can cause (bad stream file, unknown editor, bad option,
unsupported model) ends in one line ``lifelong: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_STEPS_NOTE = "default: the whole stream"
THREADS_HELP = ("compute threads (default: $LIFELONG_THREADS, else OMP_NUM_THREADS if set, else the usable cores "
                "shared among the lifelong runs alive on this machine)")


def _parse_set(values: list[str]) -> dict[str, str]:
    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got '{item}'")
        out[key.strip()] = value.strip()
    return out


def _default_out(args) -> Path:
    stream = Path(args.stream).stem if args.stream.endswith(".jsonl") else args.stream
    model = Path(args.model).name if Path(args.model).is_dir() else args.model
    return Path("runs") / f"{model}-{args.editor}-{stream}-seed{args.seed}"


def cmd_replay(args) -> int:
    from lifelong.plots import plot_run
    from lifelong.replay import replay
    from lifelong.run import RunConfig
    from lifelong.summary import format_summary

    config = RunConfig(
        model=args.model, editor=args.editor, editor_overrides=_parse_set(args.set), stream=args.stream,
        steps=args.steps, batch_size=args.batch_size, probe_every=args.probe_every, seed=args.seed,
        device=args.device, probes=list(args.probe or []),
    )
    out = Path(args.out) if args.out else _default_out(args)
    result = replay(config, out, progress=not args.quiet, threads=args.threads)
    if result.run.completed_step() < result.total_steps:
        print(f"stopped at step {result.run.completed_step()} of {result.total_steps}; re-run to resume")
        return 0
    plots = plot_run(result.run)
    print(format_summary(result.run))
    print(f"\nrun directory: {result.run.path.resolve()}")
    print(f"plots: {', '.join(str(p.resolve()) for p in plots)}")
    return 0


def cmd_show(args) -> int:
    from lifelong.run import RunDir
    from lifelong.summary import format_summary

    print(format_summary(RunDir(args.dir)))
    return 0


def cmd_plot(args) -> int:
    from lifelong.plots import plot_run
    from lifelong.run import RunDir

    for path in plot_run(RunDir(args.dir)):
        print(path)
    return 0


def cmd_compare(args) -> int:
    from lifelong.plots import plot_compare, run_labels
    from lifelong.run import RunDir
    from lifelong.summary import compare_table, configuration_labels, configurations, format_table

    if len(args.dirs) < 2:
        raise ValueError("compare needs at least two run directories")
    runs = [RunDir(d) for d in args.dirs]
    for run in runs:
        run.manifest()  # a one-line error for a directory that is not a run
    labels = run_labels(runs)
    out = Path(args.out)
    table = compare_table(runs, labels)
    out.mkdir(parents=True, exist_ok=True)
    table.write_csv(out / "compare.csv")
    figure = plot_compare(runs, out / "compare.png")
    if len({r.manifest()["identity"].get("stream_hash") for r in runs}) > 1:
        print("note: the runs replayed different streams; their figures are not directly comparable")
    for label, group in zip(configuration_labels(runs, configurations(runs)), configurations(runs)):
        if len(group) > 1:
            seeds = ", ".join(str(runs[i].manifest()["identity"]["seed"]) for i in group)
            print(f"{label}: {len(group)} runs differ only in seed ({seeds}): 'pooled' = their items as one "
                  "sample (Wilson/bootstrap, rates over items only); 'seed mean' = mean over seeds ± 95% t "
                  "interval, n = seeds")
    print(format_table(table))
    print("\neach cell: value [95% interval] n; intervals over items: Wilson for 0/1 outcomes, bootstrap "
          "(2,000 resamples, seeded) for continuous values")
    print(f"\ntable: {(out / 'compare.csv').resolve()}\nfigure: {figure.resolve()}")
    return 0


def cmd_checkout(args) -> int:
    from lifelong.models import check_checkout_target, save_model_dir
    from lifelong.replay import checkout
    from lifelong.run import RunDir

    if (args.step is None) == (args.at is None):
        raise ValueError("checkout needs exactly one of --step K or --at TIME")
    check_checkout_target(Path(args.out))
    step = args.step
    if args.at is not None:
        when = datetime.fromisoformat(args.at)
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
        step = RunDir(args.dir).step_at(when)
    lm = checkout(args.dir, step, args.device)
    if lm.editor is not None and lm.editor.adaptor:
        raise ValueError(f"editor '{lm.editor.name}' keeps its edits outside the weights (adaptor/memory state), "
                         "which a transformers directory cannot hold; use lifelong.replay.checkout in Python")
    check_checkout_target(Path(args.out))  # again: it may have changed while the model was rebuilt
    save_model_dir(lm.model, lm.tokenizer, Path(args.out), marker=f"step {step} of {Path(args.dir).resolve()}\n")
    print(f"step {step} of {args.dir} written to {Path(args.out).resolve()}")
    return 0


def cmd_train_mend(args) -> int:
    from lifelong.editors.mend import (
        TrainConfig,
        format_curve,
        load_hypernetwork,
        read_curve,
        resolve_layers,
        resolve_params,
        train_hypernetwork,
    )
    from lifelong.machine import ComputeThreads, thread_policy
    from lifelong.models import load_model

    policy = thread_policy(args.threads)
    lm = load_model(args.model, args.device)
    layers = resolve_layers(args.layers or "", lm.num_layers)
    kinds = resolve_params(args.params or "", lm.adapter)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, rank=args.rank, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, holdout=args.holdout,
                         eval_every=args.eval_every or args.checkpoint_every)
    with ComputeThreads(policy):
        path = train_hypernetwork(lm, layers, args.data, config, params=kinds, directory=args.out, limit=args.limit,
                                  progress=not args.quiet)
    curve = read_curve(path.parent / "curve.csv")
    if curve:
        print(f"learning curve ({path.parent / 'curve.csv'}; losses averaged since the previous evaluation):")
        print(format_curve(curve))
    _, meta = load_hypernetwork(path, lm.device)
    print(f"MEND hypernetwork for {args.model} layers {','.join(map(str, layers))}, params {','.join(kinds)}: "
          f"{meta['steps']} steps, {meta['seconds']:.0f} s of training, {len(meta['train_ids'])} training records"
          f"\n{path.resolve()}")
    return 0


def cmd_editors(args) -> int:
    import dataclasses

    from lifelong.editors import EDITORS

    for name, cls in sorted(EDITORS.items()):
        print(f"{name:<10}{cls.description}")
        for f in dataclasses.fields(cls.Params):
            print(f"{'':<12}--set {f.name}=  (default {f.default})")
    return 0


def cmd_streams(args) -> int:
    from streams import list_streams

    for name, description in list_streams():
        print(f"{name:<12}{description}")
    print(f"{'PATH.jsonl':<12}a stream file in the JSONL format of streams/FORMAT.md")
    return 0


def cmd_probes(args) -> int:
    from probes import PROBES

    for name, cls in sorted(PROBES.items()):
        print(f"{name:<14}{cls.description}")
        options = [f"{f.name}={f.default}" for f in dataclasses.fields(cls.Options)]
        print(f"{'':<14}schedule={cls.default_schedule}" + "".join(f", {o}" for o in options))
    return 0


def cmd_models(args) -> int:
    from lifelong.models import available_models

    for name, description in available_models():
        print(f"{name:<14}{description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lifelong", description="Sequential lifelong knowledge-editing simulator")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("replay", help="replay an edit stream through an editor, probing after each step")
    p.add_argument("--model", default="smollm2-135m", help="registered model name or local HF directory")
    p.add_argument("--editor", default="ft", help="editor name (see 'lifelong editors')")
    p.add_argument("--stream", default="builtin", help="stream name (see 'lifelong streams') or a .jsonl file")
    p.add_argument("--steps", type=int, default=None, help=f"replay the first N steps ({DEFAULT_STEPS_NOTE})")
    p.add_argument("--batch-size", type=int, default=None,
                   help="edits per step (default: one step per distinct timestamp)")
    p.add_argument("--probe-every", type=int, default=5, help="probe retention every K steps and at the end")
    p.add_argument("--out", default=None, help="run directory (default: runs/MODEL-EDITOR-STREAM-seedS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="editor hyperparameter override")
    p.add_argument("--probe", action="append", metavar="NAME[:KEY=VALUE,...]",
                   help="an extra probe (see 'lifelong probes'), e.g. perplexity:schedule=every:5")
    p.add_argument("--threads", default=None, metavar="N", help=THREADS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("show", help="print a run's summary table")
    p.add_argument("dir")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("plot", help="write a run's PNGs under DIR/plots/")
    p.add_argument("dir")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("compare", help="overlay several runs (editors on one stream): one figure, one table")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--out", default="compare", help="where compare.png and compare.csv go (default: ./compare)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("checkout", help="write the model at a step as a transformers directory")
    p.add_argument("dir")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--at", default=None, help="ISO time: the last step at or before it")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_checkout)

    p = sub.add_parser("train-mend",
                       help="train (or resume) MEND's hypernetwork; cached by model, layers, params and data")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default=None, help="edited layers, e.g. 27-29 (default: the last three)")
    p.add_argument("--params", default=None,
                   help="edited MLP weights per layer, comma-separated gate, up, down (default: all; "
                        "'down': the former down-only hypernetwork)")
    p.add_argument("--data", default="dataset:zsre_mend",
                   help="training edits: comma-separated streams (builtin, dataset:NAME, file.jsonl)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training records")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=4, help="edits per training step")
    p.add_argument("--rank", type=int, default=64, help="rank of the hypernetwork's low-rank layers")
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--holdout", type=int, default=20,
                   help="keep the last N training records out, for the learning curve's held-out edit success")
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations "
                   "(default: --checkpoint-every)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="directory (default: the cache, keyed by model, layers, params and data)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", default=None, metavar="N", help=THREADS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_mend)

    for name, func, text in (("editors", cmd_editors, "list editors and their hyperparameters"),
                             ("streams", cmd_streams, "list built-in streams"),
                             ("probes", cmd_probes, "list probes"),
                             ("models", cmd_models, "list models")):
        sub.add_parser(name, help=text).set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted: completed steps (and key-statistics text sampled so far) are saved; re-run the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lifelong: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
