"""The replay loop: stream steps -> editor -> delta store -> probes -> results (docs/DESIGN.md §2).

Resumable: each step's delta, editor state and rows are written before the step is
marked complete; re-running the same command checks the model out at the last
complete step and carries on. Every step seeds torch from (seed, step), so a resumed
run gives the same results as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
import typing
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from lifelong.core.bars import bar as progress_bar
from lifelong.core.bars import phase as progress_phase
from lifelong.core.bars import showing as bars_showing
from lifelong.core.delta import DeltaStore, KeepPolicy
from lifelong.core.machine import ComputeThreads, cpu_description, release_free_memory, thread_policy
from lifelong.core.memory import available_memory, gib
from lifelong.core.models import (
    LoadedModel,
    config_fingerprint,
    context_length,
    load_model,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from lifelong.core.scorer import Scorer
from lifelong.editors import Editor, make_editor
from lifelong.presets import PresetChoice, apply_preset, sequence_figures
from lifelong.references import CHECK_KEY, borrow, theta0_check
from lifelong.run import RunConfig, RunDir, atomic_write_text, identity_of
from lifelong.settings import normalised_number_text
from probes import EditQualityProbe, ProbeContext, ProbeSuite, RetentionProbe, make_probe
from probes import metric_table as mt
from probes.base import Probe, chain_ends
from probes.weight_drift import WARN_RELATIVE, warning_step, warning_text
from streams import EditStream, load_stream
from streams.errors import UserError


@dataclass
class ReplayResult:
    run: RunDir
    steps_run: int  # steps executed by this call (0 if the run was already complete)
    total_steps: int
    # A preset of independent sequences (wise-t): the figures averaged over them (preset.json), and
    # ``run`` is the last sequence's run.
    sequences: dict | None = None


def step_seed(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "little") & (2**63 - 1)


# Edits one step may hold: a step's edits are scored and held in memory together (a step of 300,000
# edits grew past 20 GB); EMMET's largest published batch is 10,000.
MAX_EDITS_PER_STEP = 10_000


def normalised_overrides(editor_class: type[Editor], overrides: dict[str, str]) -> dict[str, str]:
    """Editor overrides with each number spelled one way, by the type its setting declares."""
    hints = typing.get_type_hints(editor_class.Params)
    out = {}
    for key, raw in overrides.items():
        kinds = [a for a in typing.get_args(hints.get(key)) if a is not type(None)] or [hints.get(key)]
        out[key] = normalised_number_text(raw, kinds[0]) if isinstance(raw, str) else raw
    return out


def split_facts(stream: EditStream) -> tuple[EditStream, tuple]:
    """(the edits to apply, the tied-fact records): tied facts are probed, never applied."""
    tied = tuple(e for e in stream if e.chain is not None and e.chain.role == "tied-fact")
    if not tied:
        return stream, ()
    ids = {e.id for e in tied}
    return EditStream([e for e in stream if e.id not in ids], name=stream.name), tied


def prepare_stream_and_facts(config: RunConfig) -> tuple[EditStream, list, tuple, str]:
    """The stream (its seeded sample with ``config.sample``) cut to ``config.steps`` steps, those steps
    (tied-fact records left out), the tied-fact records for probes, and the (sampled) stream's hash."""
    full = load_stream(config.stream)
    if config.sample is not None:  # the seed draws which edits (whole chains, tied facts with them)
        if not 1 <= config.sample <= len(full):
            raise UserError(f"--sample must be between 1 and the stream's {len(full)} edits (got {config.sample})")
        full = full.sample(config.sample, config.seed)
    stream, facts = split_facts(full)
    if not len(stream):
        raise UserError(
            f"stream '{config.stream}' holds only tied facts ({len(facts)} edits with chain role "
            "tied-fact, which are probed, never applied): nothing to edit"
        )
    available = len(stream.steps(config.batch_size))
    if config.steps is not None:
        if config.steps < 1:
            raise UserError(f"--steps must be at least 1 (got {config.steps})")
        if config.steps > available:
            raise UserError(f"stream '{config.stream}' has {available} steps; --steps {config.steps} asks for more")
        stream = stream.head_steps(config.steps, config.batch_size)
    steps = stream.steps(config.batch_size)
    largest = max(range(len(steps)), key=lambda k: len(steps[k]))
    if len(steps[largest]) > MAX_EDITS_PER_STEP:
        raise UserError(
            f"stream '{config.stream}': step {largest + 1} holds {len(steps[largest]):,} edits (edits that share a "
            f"timestamp form one step); a step may hold at most {MAX_EDITS_PER_STEP:,}: give --batch-size to split "
            "the stream into steps of that many edits"
        )
    return stream, steps, facts, full.content_hash()


def check_step_memory(step: int, editor: Editor, lm: LoadedModel, batch: Sequence) -> None:
    """Refuse step ``step`` before it starts when the editor's estimate of its memory exceeds what is
    available on the model's device (:mod:`lifelong.core.memory`)."""
    available = available_memory(lm.device)
    if available is None:  # not readable here: nothing to compare with
        return
    need = editor.memory_estimate(lm, batch)
    if need > available:
        raise UserError(
            f"step {step} ({len(batch):,} edits): its memory is estimated at {gib(need)} beyond the model, "
            f"more than the {gib(available)} available on {lm.device}; give --batch-size K for smaller steps, "
            "lower the editor's batch settings with --set, or free memory (nothing of the step was written)"
        )


def check_context(lm: LoadedModel, stream: EditStream, facts: tuple, spec: str) -> None:
    """Refuse, naming the edit, a prompt that with its answer is longer than the model's context
    (scored anyway it would fail, or be read past the positions the model was trained on)."""
    from lifelong.core.scorer import answer_token_ids

    limit = context_length(lm.model)
    if limit is None:
        return
    for edit in (*stream, *facts):
        texts = [("prompt", edit.rendered_prompt, edit.target_new)]
        if edit.target_true is not None:
            texts.append(("prompt", edit.rendered_prompt, edit.target_true))
        texts += [(f"paraphrases[{i}]", p, edit.target_new) for i, p in enumerate(edit.paraphrases)]
        texts += [(f"neighborhood[{i}]", n.prompt, n.answer) for i, n in enumerate(edit.neighborhood)]
        for what, prompt, answer in texts:
            # Every token covers at least a byte, so only texts of about the context's length in
            # bytes can be too long: the rest are not tokenized here.
            if len(prompt.encode()) + len(answer.encode()) + 8 <= limit:
                continue
            n = len(lm.tokenizer(prompt).input_ids) + len(answer_token_ids(lm.tokenizer, answer))
            if n > limit:
                raise UserError(
                    f"stream '{spec}': edit {edit.id!r}: {what} with its answer is {n} tokens, longer "
                    f"than the {limit}-token context of model '{lm.name}'"
                )


def stream_label(spec: str) -> str:
    """How a run's identity names its stream: a stream file by its name alone, since its content
    hash identifies it (``good.jsonl``, ``./good.jsonl`` and ``/abs/good.jsonl`` are one stream)."""
    return Path(spec).name if spec.endswith(".jsonl") else spec


def default_suite(config: RunConfig) -> ProbeSuite:
    """Edit quality every step, retention every ``probe_every`` steps, then ``config.probes``;
    a ``--probe edit_quality:...`` or ``--probe retention:...`` replaces the default one."""
    extra = [make_probe(spec) for spec in config.probes]
    names = [p.name for p in extra]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"probe '{twice[0]}' is given twice")
    defaults: list[Probe] = [EditQualityProbe("every:1"), RetentionProbe(f"every:{config.probe_every}")]
    suite = ProbeSuite([p for p in defaults if p.name not in names] + extra)
    check_generation_settings(suite)
    return suite


def check_generation_settings(suite: ProbeSuite) -> None:
    """Refuse retention generation settings that edit quality does not also run: the retention matrix
    of a protocol starts from each edit's score at its own step (docs/METRICS.md §3, §6)."""
    by_name = {p.name: p for p in suite.probes}
    quality, retention = by_name.get(EditQualityProbe.name), by_name.get(RetentionProbe.name)
    if quality is None or retention is None:
        return
    own = {s.name for s in quality.options.settings()}
    missing = [s for s in retention.options.settings() if s.name not in own]
    if missing:
        opts = retention.options
        spec = f"generation={'+'.join(s.context for s in missing)}"
        for key, default in (("stop", "natural"), ("max_new_tokens", 50), ("answer_margin", 0)):
            if getattr(opts, key) != default:
                spec += f",{key}={getattr(opts, key)}"
        raise UserError(
            f"probe 'retention': generation setting '{missing[0].name}' is not run by edit_quality, whose "
            f"own-step scores retention starts from: add --probe edit_quality:{spec}"
        )


def probes_identity(suite: ProbeSuite, edits: int) -> list[dict]:
    """The suite's configuration as a run records it. Retention's ``sample`` cap is left out when the
    stream has no more edits than the cap: it changes nothing then, and runs from before the cap
    existed (all exact) keep resuming. Weight drift's default warning threshold is left out for the
    same reason (runs from before the collapse warning)."""
    out = suite.config()
    for probe in out:
        options = probe.get("options") or {}
        if probe["name"] == "retention" and options.get("sample") is not None and edits <= options["sample"]:
            del options["sample"]
        if probe["name"] == mt.WEIGHT_DRIFT and options.get("warn_relative") == WARN_RELATIVE:
            del options["warn_relative"]
            if not options:
                del probe["options"]
    return out


def model_at_step(lm: LoadedModel, editor: Editor, store: DeltaStore, current: int):
    """A context-manager factory for :attr:`ProbeContext.model_at`: step k's weights and editor
    state while the block runs, then the current step's restored bitwise."""

    @contextmanager
    def at(k: int):
        if not 0 <= k <= current:
            raise ValueError(f"cannot check out step {k} from step {current}")
        params = dict(lm.model.named_parameters())
        saved = {name: params[name].detach().clone() for name in store.base}
        state = editor.state_dict()
        store.checkout(lm.model, k)
        editor.load_step_states(store.step_states(k, editor.incremental_state))
        try:
            yield lm
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)
            editor.load_state_dict(state)

    return at


def replay(
    config: RunConfig,
    out: Path | str,
    *,
    lm: LoadedModel | None = None,
    editor: Editor | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    threads: int | str | None = None,
    exporters: Sequence = (),
    references_from: Path | str | None = None,
) -> ReplayResult:
    """Replay ``config``'s stream into run directory ``out`` (resuming it if it exists).

    ``lm`` reuses an already loaded base model (it is edited in place, and an adaptor editor's hooks
    stay on it: to reuse it for another run, pass ``editor`` and call its ``release()``); ``editor`` runs
    an editor instance (e.g. an unregistered one) instead of ``config.editor`` by name;
    ``stop_after`` ends the call after that many new steps, as a kill would (for tests);
    ``threads`` fixes the compute threads (default: see :func:`lifelong.core.machine.thread_policy`);
    ``exporters`` (:mod:`lifelong.export`) receive each step's rows as they are written (the caller closes them);
    ``references_from``: a finished run of the same stream, model and probes whose step 0 (θ0's references,
    rows and generations) this run copies instead of computing it (:mod:`lifelong.references`).
    """
    policy = thread_policy(threads)  # a bad value is refused before anything is loaded
    # held: the run's writer lock, taken once the inputs are validated, released on any exit
    with ComputeThreads(policy) as compute, ExitStack() as held, bars_showing(progress):
        config, choice = apply_preset(config)  # a bad preset, or a flag that conflicts with it, is refused here
        if choice is not None and choice.sequence_length is not None:
            if references_from:
                raise UserError("--references-from: not with a preset of independent sequences (each has its θ0 step)")
            return _replay_sequences(
                config, choice, Path(out), lm=lm, editor=editor, progress=progress, compute=compute, exporters=exporters
            )
        return _replay_locked(
            config,
            out,
            lm=lm,
            editor=editor,
            progress=progress,
            stop_after=stop_after,
            compute=compute,
            held=held,
            exporters=exporters,
            references_from=references_from,
        )


@dataclass
class RunPlan:
    """A run's inputs read and checked before the model loads: the config as the run records it."""

    config: RunConfig
    editor: Editor
    stream: EditStream
    steps: list
    facts: tuple
    stream_hash: str
    suite: ProbeSuite
    legacy: dict  # identity values as a format-1 run recorded them (identity_for_format)


def plan_inputs(config: RunConfig, editor: Editor | None = None) -> RunPlan:
    """Read the stream, make the editor and the probe suite, with one spelling per setting."""
    keep = KeepPolicy.parse(config.keep_deltas)
    config = dataclasses.replace(config, keep_deltas=str(keep))  # one spelling per policy in the identity
    if not keep.keeps_all and any(spec.split(":", 1)[0] == "chains" for spec in config.probes):
        raise UserError(
            f"--keep-deltas {keep}: the chains probe checks out earlier steps of each chain, "
            "which needs every step kept; use --keep-deltas all"
        )
    stream, steps, facts, full_hash = prepare_stream_and_facts(config)
    if editor is None:
        editor = make_editor(config.editor, config.editor_overrides)
    elif config.editor != editor.name:
        config = dataclasses.replace(config, editor=editor.name)
    typed_overrides = config.editor_overrides
    # One spelling per number (2e-2 and 0.02 are one run); a run of format 1 recorded them as typed.
    config = dataclasses.replace(config, editor_overrides=normalised_overrides(type(editor), typed_overrides))
    return RunPlan(
        config=config,
        editor=editor,
        stream=stream,
        steps=steps,
        facts=facts,
        stream_hash=full_hash if facts else stream.content_hash(),
        suite=default_suite(config),
        legacy={"editor_overrides": typed_overrides},
    )


def planned_identity(plan: RunPlan, lm: LoadedModel, base_fingerprint: str) -> dict:
    """The identity the planned run records (the editor bound to ``lm``; ``base_fingerprint``: θ0's
    weights); a stored run with another identity is a different run."""
    check_context(lm, plan.stream, plan.facts, plan.config.stream)
    plan.editor.bind(lm)
    plan.editor.check_stream(plan.stream)
    return identity_of(
        plan.config,
        hyperparameters=plan.editor.hyperparameters(),
        stream_hash=plan.stream_hash,
        stream_edits=len(plan.stream),
        stream_steps=len(plan.steps),
        probes=probes_identity(plan.suite, len(plan.stream)),
        model_family=lm.adapter.family,
        base_weights=base_fingerprint,
        base_config=config_fingerprint(lm.model),
        base_tokenizer=tokenizer_fingerprint(lm.tokenizer),
        stream=stream_label(plan.config.stream),
    )


def _replay_locked(
    config: RunConfig,
    out: Path | str,
    *,
    lm: LoadedModel | None,
    editor: Editor | None,
    progress: bool,
    stop_after: int | None,
    compute: ComputeThreads,
    held: ExitStack,
    exporters: Sequence = (),
    restore_base: bool = False,
    references_from: Path | str | None = None,
) -> ReplayResult:
    """The replay itself, under the run's writer lock. ``restore_base``: when the call ends, release
    the editor and put every parameter it may change back to θ0, bitwise (the model is reused for
    another independent sequence: :func:`_replay_sequences`)."""
    plan = plan_inputs(config, editor)  # every input the model is not needed for, refused before it loads
    config, editor, suite = plan.config, plan.editor, plan.suite
    stream, steps, facts = plan.stream, plan.steps, plan.facts
    with progress_phase(f"loading model {config.model}", show=lm is None):
        lm = lm or load_model(config.model, config.device, config.dtype)
        base_fingerprint = weights_fingerprint(lm.model)  # before any edit: the run's base model θ0
    identity = planned_identity(plan, lm, base_fingerprint)
    largest = max(range(len(steps)), key=lambda k: len(steps[k]))
    check_step_memory(largest + 1, editor, lm, steps[largest])  # the largest step, before anything is written
    run = RunDir(out)  # nothing of it exists before this point: every input above was refused first
    held.enter_context(run.writer_lock())  # one writer per run directory
    # The manifest comes before the editor's one-time preparation (key statistics can take
    # minutes): a run interrupted there resumes, and `lifelong show` can say where it stands.
    manifest = run.start(identity, legacy=plan.legacy)
    run.remove_stale_temporaries()  # half-written files of a killed writer (this one holds the lock)
    run.record_session(session_info(lm, editor, compute, run.completed_step(), config.stream))
    editor.prepare(lm)  # on θ0: before any checkout below
    store = DeltaStore.for_scope(run.deltas_dir, lm.model, editor.scope(lm), config.keep_deltas)
    scorer = Scorer(lm.model, lm.tokenizer, rewrite=editor.prompt_rewriter(lm))
    run_id = manifest["run_id"]
    ends = chain_ends(steps)  # where chains complete, for chain schedules and probes

    def rows_for(step, timestamp, rows):
        return [
            {
                "run_id": run_id,
                "step": step,
                "timestamp": timestamp,
                "probe": r.probe,
                "metric": r.metric,
                "protocol": r.protocol,
                "edit_id": r.edit_id,
                "value": r.value,
                "preset": config.preset,
            }
            for r in rows
        ]

    done = run.completed_step()
    run.check_parts(done)  # before any work: a lost part is named, not silently dropped
    run.discard_after(done)
    store.discard_after(max(done, 0))
    references = run.load_reference()
    if done < 0 or references is None:  # step 0: θ0 references and rows, on the base model
        t0 = time.perf_counter()
        check = theta0_check(scorer, stream)
        borrowed = borrow(references_from, identity, check, run_id) if references_from else None
        if borrowed is not None:  # copied from a finished run that differs only in its editor
            references, written, generations = borrowed.references, borrowed.rows, borrowed.generations
            run.record_references_source(Path(str(references_from)).resolve(), borrowed.source_run_id)
        else:
            ctx = ProbeContext(
                step=0,
                timestamp=None,
                batch=(),
                history=[],
                scorer=scorer,
                upcoming=tuple(stream),
                base_params=store.base,
                steps=steps,
                facts=facts,
                chain_end_steps=ends,
            )
            references, rows = suite.prepare(ctx)
            written, generations = rows_for(0, None, rows), ctx.generations
        run.save_reference({**references, CHECK_KEY: check})
        digest = run.write_rows(0, written)
        if generations:
            run.write_generations(0, run_id, generations)
        for exporter in exporters:
            exporter.write(0, written)
        run.mark_complete(0, None, {"probe": time.perf_counter() - t0}, len(steps), results=digest)
        done = 0
    elif done > 0:
        if progress:
            tqdm.write(resume_line(run.path, done, steps), file=sys.stderr)
        store.checkout(lm.model, done)
        editor.load_step_states(store.step_states(done, editor.incremental_state))

    todo = range(done + 1, len(steps) + 1)
    if stop_after is not None:
        todo = todo[:stop_after]
    bar = progress_bar(todo, show=progress, desc=f"replay {config.editor}", unit="step", initial=done, total=len(steps))
    warned = done > 0 and warning_step(run.results()) is not None  # a resumed run warned already
    for step in bar:
        compute.rebalance()  # other runs may have started or ended since the last step
        batch = steps[step - 1]
        check_step_memory(step, editor, lm, batch)  # again: other processes may have taken memory since
        timestamp = batch[-1].timestamp
        torch.manual_seed(step_seed(config.seed, step))
        t0 = time.perf_counter()
        delta = editor.apply(lm, batch)
        t_edit = time.perf_counter() - t0
        # Commit first: probes may check out earlier steps (model_at), which reads the store.
        store.commit(step, delta, editor.step_state(), lm.model)
        t1 = time.perf_counter()
        ctx = ProbeContext(
            step=step,
            timestamp=timestamp,
            batch=tuple(batch),
            history=list(steps[:step]),
            scorer=scorer,
            is_last=step == len(steps),
            base_params=store.base,
            model_at=model_at_step(lm, editor, store, step),
            steps=steps,
            facts=facts,
            chain_end_steps=ends,
        )
        rows = suite.run(ctx, references)
        t2 = time.perf_counter()
        written = rows_for(step, timestamp, rows)
        digest = run.write_rows(step, written)
        if ctx.generations:
            run.write_generations(step, run_id, ctx.generations)
        for exporter in exporters:
            exporter.write(step, written)
        run.mark_complete(
            step, timestamp, {"edit": t_edit, "probe": t2 - t1}, len(steps), editor.step_report(), results=digest
        )
        store.prune(step, editor.incremental_state)  # only now: until marked complete, step - 1 is the resume point
        release_free_memory()  # the step's freed tensors' pages go back to the OS: resident memory stays flat
        retained = [r.value for r in rows if r.metric == "retained_fraction" and r.protocol == "es"]
        warned = _drift_warning(rows, references, step, warned, progress)
        postfix = {"retained": f"{retained[0]:.2f}"} if retained else {}
        if warned:  # the bar keeps saying so after the warning's own line has scrolled away
            postfix["drift"] = "WARNING"
        if postfix:
            bar.set_postfix(postfix)
    bar.close()
    if run.completed_step() == len(steps):
        run.consolidate()
    if restore_base:
        editor.release()
        store.revert_to_base(lm.model)
    return ReplayResult(run=run, steps_run=len(todo), total_steps=len(steps))


def _drift_warning(rows, references: dict, step: int, warned: bool, progress: bool) -> bool:
    """Print the weight-drift probe's collapse warning the first time it fires (docs/PROBES.md); True once
    it has."""
    relative = [r.value for r in rows if r.probe == mt.WEIGHT_DRIFT and r.metric == mt.RELATIVE and r.protocol == "sum"]
    fired = any(r.probe == mt.WEIGHT_DRIFT and r.metric == mt.DRIFT_WARNING and r.value > 0.5 for r in rows)
    if fired and not warned and progress:
        tau = references.get(mt.WEIGHT_DRIFT, {}).get("warn_relative", float("nan"))
        tqdm.write(warning_text(step, relative[0] if relative else float("nan"), tau), file=sys.stderr)
    return warned or fired


def resume_line(path: Path, done: int, steps: Sequence[Sequence]) -> str:
    """The line a resumed run prints: where it carries on and what is left, in steps and edits."""
    left = len(steps) - done
    edits = sum(len(batch) for batch in steps[done:])
    if not left:
        return f"resuming {path}: all {len(steps)} steps are done"
    return (
        f"resuming {path} at step {done + 1} of {len(steps)} (edit {sum(len(b) for b in steps[:done]) + 1}): "
        f"{left} step{'s' if left != 1 else ''}, {edits} edit{'s' if edits != 1 else ''} left"
    )


SEQUENCES_FILE = "preset.json"


def _replay_sequences(
    config: RunConfig,
    choice: PresetChoice,
    out: Path,
    *,
    lm: LoadedModel | None,
    editor: Editor | None,
    progress: bool,
    compute: ComputeThreads,
    exporters: Sequence = (),
) -> ReplayResult:
    """A protocol of independent sequences (WISE's T protocol): the stream's edits cut, in order, into
    floor(N/T) sequences of T edits (at most ``sequences`` of them; the remaining edits are left out and
    counted), each replayed as its own run in ``out/sequence_NNN`` on the same loaded model, from θ0:
    after each sequence the parameters the editor changed are put back to θ0 bitwise (the delta store's
    base) and the model's weights fingerprint is checked against θ0's. ``out/preset.json`` gets each
    sequence's figures and their mean over sequences (n = sequences, 95% t interval cut to [0, 1]).
    A sequence whose run is already complete is not replayed again (resume)."""
    T = choice.sequence_length
    assert T is not None
    if RunDir(out).exists():
        raise UserError(
            f"{out} is the run directory of a single run; --preset {choice.spec} writes a directory of runs"
        )
    stream, _steps, _facts, _hash = prepare_stream_and_facts(config)
    edits = list(stream)
    count = len(edits) // T
    cap = choice.options.get("sequences")
    if cap is not None:
        count = min(count, cap)
    if count < 1:
        raise UserError(f"--preset {choice.spec}: the stream has {len(edits)} edits, fewer than one sequence of {T}")
    lm = lm or load_model(config.model, config.device, config.dtype)
    theta0 = weights_fingerprint(lm.model)
    runs, ran, total = [], 0, 0
    for i in range(count):
        part = EditStream(edits[i * T : (i + 1) * T], name=f"sequence_{i + 1:03d}")
        path = out / "streams" / f"sequence_{i + 1:03d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        part.to_jsonl(path)
        sub = dataclasses.replace(config, stream=str(path), sample=None, steps=None)
        run = RunDir(out / f"sequence_{i + 1:03d}")
        total += T
        if run.exists() and run.completed_step() == run.progress()["total_steps"] == T:
            runs.append(run)
            continue
        fresh = make_editor(config.editor, config.editor_overrides) if editor is None else type(editor)(editor.params)
        with ExitStack() as held:
            result = _replay_locked(
                sub,
                run.path,
                lm=lm,
                editor=fresh,
                progress=progress,
                stop_after=None,
                compute=compute,
                held=held,
                exporters=exporters,
                restore_base=True,
            )
        if weights_fingerprint(lm.model) != theta0:
            raise RuntimeError(f"{run.path}: the model's weights are not θ0's after the sequence was rolled back")
        runs.append(result.run)
        ran += result.steps_run
    summary = sequence_figures(choice, [r.results() for r in runs], [str(r.path.name) for r in runs])
    summary["edits_in_stream"] = len(edits)
    summary["edits_left_out"] = len(edits) - count * T
    atomic_write_text(out / SEQUENCES_FILE, json.dumps(summary, indent=2))
    return ReplayResult(run=runs[-1], steps_run=ran, total_steps=total, sequences=summary)


def session_info(lm: LoadedModel, editor: Editor, compute: ComputeThreads, from_step: int, stream: str) -> dict:
    """What this machine and session bring to a run, for its manifest: the CPU, device, threads
    and each compute-precision setting as resolved here (none of it changes what is computed,
    beyond rounding), and where the stream was read from (``--config MANIFEST`` reads it there)."""
    source = str(Path(stream).resolve()) if stream.endswith(".jsonl") else stream
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "from_step": max(from_step, 0),
        "device": str(lm.device),
        "device_map": lm.device_map,  # --device auto: module path -> GPU (None on one device)
        "cpu": cpu_description(),
        "threads": compute.describe(),
        "numerics": editor.numerics(lm),
        "precision": editor.precision(lm),  # the weights' dtype and each sensitive part's
        "stream": source,
    }


def checkout(
    run_path: Path | str, step: int, device: str = "cpu", editor_class: type[Editor] | None = None
) -> LoadedModel:
    """The model of run ``run_path`` as it was right after ``step``, rebuilt from base + deltas.

    An adaptor editor (GRACE, WISE, the in-context memory: edits outside the weights) is
    rebuilt with the run's hyperparameters, bound to the model with its state at ``step``
    and kept as ``lm.editor``: GRACE and WISE act through the hooks it installs, the memory
    through ``lm.editor.prompt_rewriter(lm)`` (see :func:`scorer_for`). ``editor_class``: the
    editor's class, for a run made with an editor instance that no name or class path finds.
    """
    from lifelong.editors import editor_class as find_editor_class
    from lifelong.editors import parse_overrides

    run = RunDir(run_path)
    identity = run.manifest()["identity"]
    done = run.completed_step()
    if not 0 <= step <= done:
        raise UserError(f"{run.path}: step {step} is not available (completed steps: 0..{max(done, 0)})")
    lm = load_model(identity["model"], device, identity.get("dtype", "float32"))
    for key, what, now in (
        ("base_weights", "weights", lambda: weights_fingerprint(lm.model)),
        ("base_config", "configuration", lambda: config_fingerprint(lm.model)),
        ("base_tokenizer", "tokenizer", lambda: tokenizer_fingerprint(lm.tokenizer)),
    ):
        if identity.get(key) not in (None, now()):  # None: a run of an earlier format did not record it
            raise UserError(
                f"{run.path}: the {what} of model '{identity['model']}' are not the ones this run "
                "started from (their fingerprint differs); a checkout on them would be wrong"
            )
    # A freshly loaded model is the base: apply deltas (or copy a snapshot) only.
    store = DeltaStore(run.deltas_dir, {}, identity.get("keep_deltas"))
    # The run's editor class, refused when it cannot be loaded here (it may act outside the weights);
    # ``editor_class`` gives it for a run of an unregistered editor instance.
    cls = editor_class or find_editor_class(identity["editor"])
    if cls.adaptor:  # bound on θ0, before any delta, as replay binds it
        editor = cls(parse_overrides(cls.Params, identity.get("hyperparameters") or {}, cls.name))
        editor.bind(lm)
        lm.editor = editor
    store.checkout(lm.model, step)
    if cls.adaptor:
        editor.load_step_states(store.step_states(step, editor.incremental_state))
    return lm


def scorer_for(lm: LoadedModel, **kwargs) -> Scorer:
    """A scorer that sees ``lm`` as its editor does (prompts rewritten by an in-context memory)."""
    rewrite = lm.editor.prompt_rewriter(lm) if lm.editor is not None else None
    return Scorer(lm.model, lm.tokenizer, rewrite=rewrite, **kwargs)
