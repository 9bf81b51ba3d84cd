"""The replay loop: stream steps -> editor -> delta store -> probes -> results (DESIGN.md §2).

Resumable: each step's delta, editor state and rows are written before the step is
marked complete; re-running the same command checks the model out at the last
complete step and carries on. Every step seeds torch from (seed, step), so a resumed
run gives the same results as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lifelong.delta import DeltaStore
from lifelong.editors import Editor, make_editor
from lifelong.models import LoadedModel, load_model
from lifelong.run import RunConfig, RunDir, identity_of
from probes import EditQualityProbe, ProbeContext, ProbeSuite, RetentionProbe, Scorer
from streams import EditStream, load_stream


@dataclass
class ReplayResult:
    run: RunDir
    steps_run: int  # steps executed by this call (0 if the run was already complete)
    total_steps: int


def step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "little") & (2**63 - 1)


def prepare_stream(config: RunConfig) -> tuple[EditStream, list]:
    """The stream cut to ``config.steps`` steps, and those steps."""
    stream = load_stream(config.stream)
    tied = [e.id for e in stream if e.chain is not None and e.chain.role == "tied-fact"]
    if tied:
        raise ValueError(f"stream '{config.stream}' holds {len(tied)} tied-fact records (e.g. {tied[0]}): they are "
                         "facts to probe, not edits to apply; read it with include_tied_fact=False")
    available = len(stream.steps(config.batch_size))
    if config.steps is not None:
        if config.steps < 1:
            raise ValueError(f"--steps must be at least 1 (got {config.steps})")
        if config.steps > available:
            raise ValueError(f"stream '{config.stream}' has {available} steps; --steps {config.steps} asks for more")
        stream = stream.head_steps(config.steps, config.batch_size)
    return stream, stream.steps(config.batch_size)


def default_suite(config: RunConfig) -> ProbeSuite:
    return ProbeSuite([EditQualityProbe("every:1"), RetentionProbe(f"every:{config.probe_every}")])


def replay(config: RunConfig, out: Path | str, *, lm: LoadedModel | None = None, editor: Editor | None = None,
           progress: bool = True, stop_after: int | None = None) -> ReplayResult:
    """Replay ``config``'s stream into run directory ``out`` (resuming it if it exists).

    ``lm`` reuses an already loaded base model (it is edited in place); ``editor`` runs
    an editor instance (e.g. an unregistered one) instead of ``config.editor`` by name;
    ``stop_after`` ends the call after that many new steps, as a kill would (for tests).
    """
    stream, steps = prepare_stream(config)
    if editor is None:
        editor = make_editor(config.editor, config.editor_overrides)
    elif config.editor != editor.name:
        config = dataclasses.replace(config, editor=editor.name)
    suite = default_suite(config)
    lm = lm or load_model(config.model, config.device)
    editor.bind(lm)
    editor.check_stream(stream)
    editor.prepare(lm)  # on θ0: before any checkout below
    run = RunDir(out)
    manifest = run.start(identity_of(
        config, hyperparameters=editor.hyperparameters(), stream_hash=stream.content_hash(),
        stream_edits=len(stream), stream_steps=len(steps), probes=suite.config(), model_family=lm.adapter.family,
    ))
    store = DeltaStore.for_scope(run.deltas_dir, lm.model, editor.scope(lm))
    scorer = Scorer(lm.model, lm.tokenizer)
    run_id = manifest["run_id"]

    def rows_for(step, timestamp, rows):
        return [{"run_id": run_id, "step": step, "timestamp": timestamp, "probe": r.probe, "metric": r.metric,
                 "protocol": r.protocol, "edit_id": r.edit_id, "value": r.value} for r in rows]

    done = run.completed_step()
    run.discard_after(done)
    store.discard_after(max(done, 0))
    references = run.load_reference()
    if done < 0 or references is None:  # step 0: θ0 references and rows, on the base model
        t0 = time.perf_counter()
        ctx = ProbeContext(step=0, timestamp=None, batch=(), history=[], scorer=scorer, upcoming=tuple(stream))
        references, rows = suite.prepare(ctx)
        run.save_reference(references)
        run.write_rows(0, rows_for(0, None, rows))
        run.mark_complete(0, None, {"probe": time.perf_counter() - t0}, len(steps))
        done = 0
    elif done > 0:
        store.checkout(lm.model, done)
        editor.load_state_dict(store.load_state(done))

    todo = range(done + 1, len(steps) + 1)
    if stop_after is not None:
        todo = todo[:stop_after]
    bar = tqdm(todo, desc=f"replay {config.editor}", unit="step", disable=not progress, initial=done, total=len(steps))
    for step in bar:
        batch = steps[step - 1]
        timestamp = batch[-1].timestamp
        torch.manual_seed(step_seed(config.seed, step))
        t0 = time.perf_counter()
        delta = editor.apply(lm, batch)
        t1 = time.perf_counter()
        ctx = ProbeContext(step=step, timestamp=timestamp, batch=tuple(batch), history=list(steps[:step]),
                           scorer=scorer, is_last=step == len(steps))
        rows = suite.run(ctx, references)
        t2 = time.perf_counter()
        store.commit(step, delta, editor.state_dict())
        run.write_rows(step, rows_for(step, timestamp, rows))
        run.mark_complete(step, timestamp, {"edit": t1 - t0, "probe": t2 - t1}, len(steps))
        retained = [r.value for r in rows if r.metric == "retained_fraction" and r.protocol == "es"]
        if retained:
            bar.set_postfix(retained=f"{retained[0]:.2f}")
    bar.close()
    if run.completed_step() == len(steps):
        run.consolidate()
    return ReplayResult(run=run, steps_run=len(todo), total_steps=len(steps))


def checkout(run_path: Path | str, step: int, device: str = "cpu") -> LoadedModel:
    """The model of run ``run_path`` as it was right after ``step``, rebuilt from base + deltas."""
    run = RunDir(run_path)
    identity = run.manifest()["identity"]
    done = run.completed_step()
    if not 0 <= step <= done:
        raise ValueError(f"{run.path}: step {step} is not available (completed steps: 0..{max(done, 0)})")
    lm = load_model(identity["model"], device)
    store = DeltaStore(run.deltas_dir, {})  # a freshly loaded model is the base: apply deltas only
    for k in range(1, step + 1):
        store.load_delta(k).apply(lm.model)
    return lm
