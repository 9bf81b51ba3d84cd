"""Running a claim's arms: each seed's stream drawn from its data set, each run an ordinary run
directory under ``--work`` that resumes, every run started from θ0 on one loaded model. An arm whose
units are chains (``units = "chains"``) runs each chain as its own run from θ0, the weights put back
after it (the Pitfalls code's protocol), so that its chains are independent units."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl

from .claims import CHAIN_SOURCES, DATASETS, Arm, Claim
from .measures import UNIT


def build_stream(source: str, count: int, seed: int, transform: str = ""):
    """``count`` items of ``source`` drawn with ``seed``: plain edits, or whole chains laid out
    one after another (round, reverse, composite); ``transform`` (a key of claims.TRANSFORMS) turns the
    chains into their control's."""
    from streams import read_dataset
    from streams.generators import chains_of, layout

    stream, _ = read_dataset(DATASETS[source])
    rng = np.random.default_rng(seed)
    if source not in CHAIN_SOURCES:
        picked = sorted(rng.choice(len(stream), size=min(count, len(stream)), replace=False))
        return layout([(stream[int(i)],) for i in picked], name=f"{source}-seed{seed}")
    chains = chains_of(stream)
    picked = sorted(rng.choice(len(chains), size=min(count, len(chains)), replace=False))
    chosen = [chains[int(i)] for i in picked]
    if transform:
        chosen = TRANSFORM_FUNCTIONS[transform](chosen)
    return layout(chosen, name=f"{source}-seed{seed}" + (f"-{transform}" if transform else ""))


def noop_round(chains: list[tuple]) -> list[tuple]:
    """Each round chain o → o* → o as o → o → o: its outward edits aimed at o itself (no true object
    given: nothing is known to be replaced), so the chain probe measures what re-asserting o does to the
    object distribution, the round trip's control."""
    out = []
    for chain in chains:
        back = chain[-1]
        o = back.target_new
        out.append(tuple(dataclasses.replace(e, target_new=o, target_true=None) for e in chain))
    return out


def unrelated_e2(chains: list[tuple]) -> list[tuple]:
    """Each conflict chain's second edit replaced by the next chain's (a different subject; the last
    chain takes the first's), keeping the chain's id, role, timestamp and tied fact: the chain probe
    then measures e1's loss (CM) and the tied fact's damage (TFD) after an unrelated edit, the control
    of a conflicting one."""
    if len(chains) < 2:
        raise ValueError("an unrelated-edit control needs at least two chains")
    out = []
    for i, chain in enumerate(chains):
        mine = next(e for e in chain if e.chain is not None and e.chain.role == "conflict-e2")
        other = next(
            e
            for k in range(1, len(chains))
            for e in chains[(i + k) % len(chains)]
            if e.chain is not None and e.chain.role == "conflict-e2" and e.subject not in {x.subject for x in chain}
        )
        swap = dataclasses.replace(other, id=f"{mine.id}~unrelated", chain=mine.chain, timestamp=mine.timestamp)
        out.append(tuple(swap if e is mine else e for e in chain))
    return out


TRANSFORM_FUNCTIONS = {"noop-round": noop_round, "unrelated-e2": unrelated_e2}


def chain_parts(stream) -> list[tuple[str, object]]:
    """(chain id, a stream of that chain's records alone) for each chain of ``stream``, in order."""
    from streams import EditStream
    from streams.generators import chains_of

    parts = []
    for chain in chains_of(stream):
        cid = chain[0].chain.chain_id if chain[0].chain is not None else chain[0].id
        parts.append((cid, EditStream(list(chain), name=cid)))
    return parts


def stream_path(arm: Arm, scale: str, seed: int, work: Path) -> Path:
    """The arm's stream file for ``seed`` under ``work`` (written if absent)."""
    streams = work / "streams"
    streams.mkdir(parents=True, exist_ok=True)
    source = arm.source_at(scale)
    path = streams / f"{source}-{arm.count(scale)}-seed{seed}{f'-{arm.transform}' if arm.transform else ''}.jsonl"
    if not path.exists():
        build_stream(source, arm.count(scale), seed, arm.transform).to_jsonl(path)
    return path


def chain_configs(arm: Arm, scale: str, seed: int, work: Path, model: str) -> list[tuple[str, object]]:
    """A chain-unit arm's runs for ``seed``: (chain id, its RunConfig), each chain's stream file written
    beside the arm's stream if absent."""
    from streams import EditStream

    whole = stream_path(arm, scale, seed, work)
    folder = whole.with_suffix("")
    folder.mkdir(exist_ok=True)
    configs = []
    for cid, part in chain_parts(EditStream.from_jsonl(whole)):
        path = folder / f"{cid}.jsonl"
        if not path.exists():
            part.to_jsonl(path)
        configs.append((cid, dataclasses.replace(arm_config(arm, scale, seed, work, model), stream=str(path))))
    return configs


def arm_config(arm: Arm, scale: str, seed: int, work: Path, model: str):
    """The RunConfig of the arm's run for ``seed`` (its stream file written under ``work`` if absent)."""
    from lifelong.run import RunConfig

    path = stream_path(arm, scale, seed, work)
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
    """The arm's run for ``seed`` (resumed or made), from θ0; its results. A chain-unit arm: each chain's
    run, each from θ0, their results joined with the chain named in column ``unit``."""
    out = run_dir(work, scale, arm, seed)
    if arm.units != "chains":
        return _replay_from_theta0(lm, base, arm, arm_config(arm, scale, seed, work, model), out, threads)
    frames = []
    for cid, config in chain_configs(arm, scale, seed, work, model):
        results = _replay_from_theta0(lm, base, arm, config, out / cid, threads)
        frames.append(results.with_columns(pl.lit(cid).alias(UNIT)))
    restore_base(lm, base)
    return pl.concat(frames)


def _replay_from_theta0(lm, base: dict, arm: Arm, config, out: Path, threads) -> pl.DataFrame:
    from lifelong.editors import make_editor
    from lifelong.replay import replay

    restore_base(lm, base)  # every run starts from θ0
    editor = make_editor(arm.editor, dict(arm.overrides))
    try:  # the model is reused by the next run: an adaptor's hooks must not stay on it
        result = replay(config, out, lm=lm, editor=editor, threads=threads)
    finally:
        editor.release()
    return result.run.results()


def run_dir(work: Path, scale: str, arm: Arm, seed: int) -> Path:
    batch = arm.batch_at(scale)
    items = f"{arm.source_at(scale)}{arm.count(scale)}{f'-batch{batch}' if batch else ''}"
    name = f"{arm.editor}-{arm.key}-{items}-seed{seed}"  # a chain-unit arm: a folder of runs, one per chain
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


def stored_results(
    work: Path, scale: str, arm: Arm, seed: int, model: BaseModel, archive: Path | None = None
) -> pl.DataFrame | None:
    """A finished run's results, or None (absent, incomplete, or stale: made by other settings or
    another version of an editor's defaults than the arm now plans; such a run is moved aside). A
    chain-unit arm: every chain's run finished and current, their results joined (column ``unit``).
    With ``archive`` (a folder), a finished current run is archived there, and a run that is not under
    ``work`` is read from there when its archived identity is the one its arm plans now."""
    path = run_dir(work, scale, arm, seed)
    dest = archive_dir(archive, model.name, scale, path) if archive is not None else None
    if arm.units != "chains":
        return _stored_run(path, lambda: arm_config(arm, scale, seed, work, model.name), model, dest)
    frames = []
    for cid, config in chain_configs(arm, scale, seed, work, model.name):
        results = _stored_run(path / cid, lambda config=config: config, model, dest / cid if dest else None)
        if results is None:
            return None
        frames.append(results.with_columns(pl.lit(cid).alias(UNIT)))
    return pl.concat(frames)


def _stored_run(path: Path, config, model: BaseModel, dest: Path | None) -> pl.DataFrame | None:
    from benchmarks import run_archive
    from lifelong.run import RunDir
    from streams.errors import UserError

    run = RunDir(path)
    progress = run.progress() if run.exists() else None
    if progress is None or not run_archive.is_finished(progress):
        stored = run_archive.load(dest) if dest is not None else None
        if stored is None:
            return None
        try:
            differs = run_archive.identity_differences(stored, *planned_identity_of(config(), model))
        except UserError as err:
            print(f"{dest}: cannot check that it is the run its arm plans now, not used: {err}", flush=True)
            return None
        if differs:
            print(f"{dest}: an archived run made by other settings (differs in: {', '.join(differs)}), not used")
            return None
        return stored.results
    try:
        differs = identity_differences(run, config(), model)
    except UserError as err:  # e.g. MEND's hypernetwork file is gone: the run cannot be checked, so not reused
        print(f"{path}: cannot check that it is the run its arm plans now, not reused: {err}", flush=True)
        return None
    if differs:
        aside = next(p for k in range(1, 10**6) if not (p := path.with_name(f"{path.name}.stale-{k}")).exists())
        path.rename(aside)
        print(f"{path}: a stale run (differs in: {', '.join(differs)}), moved to {aside.name}", flush=True)
        return None
    if dest is not None:
        return run_archive.archive(run, dest, lambda results: results).results
    return run.results()


def identity_differences(run, config, model: BaseModel) -> list[str]:
    """The identity fields in which a stored run differs from the run ``config`` plans now."""
    return run.identity_differences(*planned_identity_of(config, model))


def planned_identity_of(config, model: BaseModel) -> tuple[dict, dict]:
    """(the identity the run ``config`` would record now, its legacy fields)."""
    from lifelong.editors import make_editor
    from lifelong.replay import plan_inputs, planned_identity

    plan = plan_inputs(config, make_editor(config.editor, dict(config.editor_overrides)))
    fingerprint = model.fingerprint
    restore_base(model.lm, model.base)  # the identity is θ0's: the model may hold the last run's edits
    try:
        planned = planned_identity(plan, model.lm, fingerprint)
    finally:
        plan.editor.release()  # an adaptor's hooks must not stay on the shared model
    return planned, plan.legacy


def archive_dir(archive: Path, model: str, scale: str, run: Path) -> Path:
    """Where the run directory ``run`` is archived: by model, scale and the run's name."""
    return archive / model / scale / run.name


def run_minutes(
    work: Path, scale: str, claim: Claim, seeds: range, archive: Path | None = None, model: str = "smollm2-135m"
) -> float:
    """Minutes the claim's runs have spent so far (edits and probes, every session; finished or not;
    runs that are only in ``archive`` by their archived timings)."""
    from benchmarks import run_archive
    from lifelong.run import RunDir

    total = 0.0
    for arm in claim.arms:
        for seed in seeds:
            path = run_dir(work, scale, arm, seed)
            dest = archive_dir(archive, model, scale, path) if archive is not None else None
            if arm.units == "chains":
                names = {p.name for p in path.iterdir() if p.is_dir()} if path.is_dir() else set()
                names |= {p.stem for p in dest.glob("*.json")} if dest is not None and dest.is_dir() else set()
                pairs = [(path / n, dest / n if dest else None) for n in sorted(names)]
            else:
                pairs = [(path, dest)]
            for folder, stored in pairs:
                run = RunDir(folder)
                archived = run_archive.load(stored) if stored is not None and not run.exists() else None
                progress = run.progress() if run.exists() else archived.progress if archived else None
                if progress:
                    total += sum(sum(v.values()) for v in progress["seconds"].values())
    return total / 60
