"""Running a claim's arms: each seed's stream drawn from its data set, each run an ordinary run
directory under ``--work`` that resumes, every run started from θ0 on one loaded model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from .claims import CHAIN_SOURCES, DATASETS, Arm, Claim


def build_stream(source: str, count: int, seed: int):
    """``count`` items of ``source`` drawn with ``seed``: plain edits, or whole chains laid out
    one after another (round, reverse, composite)."""
    from streams import read_dataset
    from streams.generators import chains_of, layout

    stream, _ = read_dataset(DATASETS[source])
    rng = np.random.default_rng(seed)
    if source not in CHAIN_SOURCES:
        picked = sorted(rng.choice(len(stream), size=min(count, len(stream)), replace=False))
        return layout([(stream[int(i)],) for i in picked], name=f"{source}-seed{seed}")
    chains = chains_of(stream)
    picked = sorted(rng.choice(len(chains), size=min(count, len(chains)), replace=False))
    return layout([chains[int(i)] for i in picked], name=f"{source}-seed{seed}")


def run_arm(lm, base: dict, arm: Arm, scale: str, seed: int, work: Path, model: str, threads) -> pl.DataFrame:
    """The arm's run for ``seed`` (resumed or made), from θ0; its results."""
    import torch

    from lifelong.editors import make_editor
    from lifelong.replay import replay
    from lifelong.run import RunConfig

    streams = work / "streams"
    streams.mkdir(parents=True, exist_ok=True)
    source = arm.source_at(scale)
    path = streams / f"{source}-{arm.count(scale)}-seed{seed}.jsonl"
    if not path.exists():
        build_stream(source, arm.count(scale), seed).to_jsonl(path)
    with torch.no_grad():  # every run starts from θ0
        for name, p in lm.model.named_parameters():
            p.copy_(base[name])
    config = RunConfig(
        model=model,
        editor=arm.editor,
        editor_overrides=dict(arm.overrides),
        stream=str(path),
        batch_size=arm.batch_at(scale),
        probe_every=arm.probe_every,
        seed=seed,
        probes=list(arm.probes),
    )
    editor = make_editor(arm.editor, dict(arm.overrides))
    try:  # the model is reused by the next run: an adaptor's hooks must not stay on it
        result = replay(config, run_dir(work, scale, arm, seed), lm=lm, editor=editor, threads=threads)
    finally:
        editor.release()
    return result.run.results()


def run_dir(work: Path, scale: str, arm: Arm, seed: int) -> Path:
    batch = arm.batch_at(scale)
    items = f"{arm.source_at(scale)}{arm.count(scale)}{f'-batch{batch}' if batch else ''}"
    name = f"{arm.editor}-{arm.key}-{items}-seed{seed}"
    return work / scale / name


def stored_results(work: Path, scale: str, arm: Arm, seed: int) -> pl.DataFrame | None:
    """A finished run's results, or None (absent or incomplete)."""
    from lifelong.run import RunDir

    run = RunDir(run_dir(work, scale, arm, seed))
    if not run.exists():
        return None
    progress = run.progress()
    if progress["total_steps"] is None or progress["completed_step"] < progress["total_steps"]:
        return None
    return run.results()


def run_minutes(work: Path, scale: str, claim: Claim, seeds: range) -> float:
    """Minutes the claim's runs have spent so far (edits and probes, every session; finished or not)."""
    from lifelong.run import RunDir

    total = 0.0
    for arm in claim.arms:
        for seed in seeds:
            run = RunDir(run_dir(work, scale, arm, seed))
            if run.exists():
                total += sum(sum(v.values()) for v in run.progress()["seconds"].values())
    return total / 60
