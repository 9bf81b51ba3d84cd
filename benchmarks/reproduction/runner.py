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


def arm_config(arm: Arm, scale: str, seed: int, work: Path, model: str):
    """The RunConfig of the arm's run for ``seed`` (its stream file written under ``work`` if absent)."""
    from lifelong.run import RunConfig

    streams = work / "streams"
    streams.mkdir(parents=True, exist_ok=True)
    source = arm.source_at(scale)
    path = streams / f"{source}-{arm.count(scale)}-seed{seed}.jsonl"
    if not path.exists():
        build_stream(source, arm.count(scale), seed).to_jsonl(path)
    return RunConfig(
        model=model,
        editor=arm.editor,
        editor_overrides=dict(arm.overrides),
        stream=str(path),
        batch_size=arm.batch_at(scale),
        probe_every=arm.probe_every,
        seed=seed,
        probes=list(arm.probes),
    )


def run_arm(lm, base: dict, arm: Arm, scale: str, seed: int, work: Path, model: str, threads) -> pl.DataFrame:
    """The arm's run for ``seed`` (resumed or made), from θ0; its results."""

    from lifelong.editors import make_editor
    from lifelong.replay import replay

    restore_base(lm, base)  # every run starts from θ0
    config = arm_config(arm, scale, seed, work, model)
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


class BaseModel:
    """The model every run starts from, loaded on first use, with θ0's weights and fingerprint."""

    def __init__(self, name: str):
        self.name = name
        self._loaded: tuple | None = None
        self._fingerprint: str | None = None

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def _load(self) -> tuple:
        if self._loaded is None:
            from lifelong.core.models import load_model

            lm = load_model(self.name)
            self._loaded = (lm, {n: p.detach().clone() for n, p in lm.model.named_parameters()})
        return self._loaded

    @property
    def lm(self):
        return self._load()[0]

    @property
    def base(self) -> dict:
        return self._load()[1]

    @property
    def fingerprint(self) -> str:
        """θ0's weights fingerprint (taken before any run edits the model)."""
        if self._fingerprint is None:
            from lifelong.core.models import weights_fingerprint

            lm = self.lm
            restore_base(lm, self.base)
            self._fingerprint = weights_fingerprint(lm.model)
        return self._fingerprint


def restore_base(lm, base: dict) -> None:
    """Put θ0's weights back on the shared model (every run starts from them)."""
    import torch

    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            p.copy_(base[name])


def stored_results(work: Path, scale: str, arm: Arm, seed: int, model: BaseModel) -> pl.DataFrame | None:
    """A finished run's results, or None (absent, incomplete, or stale: made by other settings or
    another version of an editor's defaults than the arm now plans; such a run is moved aside)."""
    from lifelong.run import RunDir

    path = run_dir(work, scale, arm, seed)
    run = RunDir(path)
    if not run.exists():
        return None
    progress = run.progress()
    if progress["total_steps"] is None or progress["completed_step"] < progress["total_steps"]:
        return None
    from streams.errors import UserError

    try:
        differs = identity_differences(run, arm_config(arm, scale, seed, work, model.name), model)
    except UserError as err:  # e.g. MEND's hypernetwork file is gone: the run cannot be checked, so not reused
        print(f"{path}: cannot check that it is the run its arm plans now, not reused: {err}", flush=True)
        return None
    if differs:
        aside = next(p for k in range(1, 10**6) if not (p := path.with_name(f"{path.name}.stale-{k}")).exists())
        path.rename(aside)
        print(f"{path}: a stale run (differs in: {', '.join(differs)}), moved to {aside.name}", flush=True)
        return None
    return run.results()


def identity_differences(run, config, model: BaseModel) -> list[str]:
    """The identity fields in which a stored run differs from the run ``config`` plans now."""
    from lifelong.editors import make_editor
    from lifelong.replay import plan_inputs, planned_identity

    plan = plan_inputs(config, make_editor(config.editor, dict(config.editor_overrides)))
    fingerprint = model.fingerprint
    restore_base(model.lm, model.base)  # the identity is θ0's: the model may hold the last run's edits
    try:
        planned = planned_identity(plan, model.lm, fingerprint)
    finally:
        plan.editor.release()  # an adaptor's hooks must not stay on the shared model
    return run.identity_differences(planned, plan.legacy)


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
