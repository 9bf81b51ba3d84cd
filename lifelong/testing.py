"""A property-testing kit for editors: hypothesis strategies, tiny models and invariant checks.

Any :class:`~lifelong.editors.base.Editor` — one of ours or your own — can be checked
against the contract of docs/DESIGN.md §3/§5 on tiny seeded models in a few seconds::

    from lifelong.testing import check_editor
    from lifelong.editors import make_editor

    report = check_editor(lambda: make_editor("ft", {"layer": "1", "max_steps": "15"}),
                          model="tiny-llama", max_examples=3)
    print(report)               # one line per invariant, and a minimal failing example for each failure
    report.raise_if_failed()    # AssertionError with that summary (works in pytest and in plain Python)

On a shared machine, ``torch.set_num_threads(1)`` first makes these tiny-model checks
several times faster (OpenMP threads spin when the cores are busy).

``editor_factory`` is called for a fresh editor every time one is needed, so no state
leaks between examples. Hypothesis draws short edit streams (:func:`edit_streams`)
over a small vocabulary, runs each invariant, and shrinks a failure to a minimal
stream, which the report prints.

The invariants (:data:`INVARIANTS`; pick a subset by name with ``invariants=[...]``):

- ``revert_restores_base``: after any steps, ``DeltaStore.revert_to_base`` / ``checkout(0)``
  give back θ0 bitwise, for every parameter of the model;
- ``checkout_equals_live``: ``lifelong.replay.checkout(run, k)`` equals the live model at step k;
- ``empty_batch_is_noop``: ``apply(lm, [])`` returns an empty Delta and changes nothing;
- ``deterministic``: same model, same seed, same edits -> bitwise equal weights and deltas;
- ``scope_respected``: parameters outside ``editor.scope(lm)`` stay bitwise unchanged;
- ``delta_matches_change``: live weights after a step == weights before + the returned Delta;
- ``resume_same_results``: a replay killed after some steps and resumed by a fresh process
  (fresh model, fresh editor, state from ``state_dict``) ends with the same results table;
- ``metric_bounds``: every score in the results lies in its range ([0, 1] for fractions,
  [0, ln 2] for Jensen-Shannon distortion when ``probes.distortion`` exists).

Editor-specific equations apply only to the editors they are registered for
(:data:`EQUATIONS`, :func:`register_equation`), or that an editor lists itself
through an optional ``testing_invariants()`` method returning :class:`Invariant` s;
``rome_writes_key_value`` (‖W'k + b − v*‖/‖v*‖ < 1e-4) is registered for ROME and r-ROME,
``alphaedit_preserves_nullspace_outputs`` (ΔW maps preserved keys to ~0) for AlphaEdit.
A later editor adds its own, e.g. GRACE "identity outside the codebook radii"::

    register_equation(MyEditor, Invariant("my_equation", my_check, "what it checks"))

The kit drives the real replay loop for the run-level invariants, passing it a fresh
editor from the factory, so unregistered editors are tested the same way.
"""

from __future__ import annotations

import datetime
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from lifelong.delta import Delta, DeltaStore
from lifelong.editors.base import Editor
from lifelong.models import LoadedModel, load_model
from streams import ChainLink, Edit, EditStream, Fact, Neighbor
from streams.facts import Relation

__all__ = [
    "SUBJECTS", "RELATIONS", "facts", "edits", "edit_streams", "tiny_model_specs", "tiny_models", "fresh_model",
    "format_stream", "Invariant", "InvariantViolation", "EditorUnderTest", "INVARIANTS", "EQUATIONS",
    "register_equation", "invariants_for", "Failure", "Report", "check_editor",
]

# --------------------------------------------------------------------------------------------
# Strategies over a small vocabulary (short strings: byte-tokenized prompts stay short)

SUBJECTS: tuple[str, ...] = ("Ada", "Bo", "Cy", "Dee", "Eli")
"""Subjects the strategies draw from."""

RELATIONS: tuple[Relation, ...] = (
    Relation("capital", "The capital of {} is", ("{}'s capital is",), ("Rome", "Oslo", "Lima", "Bern")),
    Relation("lang", "{} speaks", ("The language of {} is",), ("Dutch", "Thai", "Farsi", "Greek")),
    Relation("color", "{} is colored", ("The color of {} is",), ("red", "blue", "green", "pink")),
)
"""Relations the strategies draw from: template, paraphrase templates, candidate objects."""

_EPOCH = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


@st.composite
def facts(draw, subjects: Sequence[str] = SUBJECTS, relations: Sequence[Relation] = RELATIONS) -> Fact:
    """A :class:`streams.Fact` (subject, relation, true object, a different new object), maybe with a neighbor."""
    relation = draw(st.sampled_from(relations))
    subject = draw(st.sampled_from(subjects))
    true, new = draw(st.lists(st.sampled_from(relation.candidates), min_size=2, max_size=2, unique=True))
    neighborhood = ()
    if draw(st.booleans()):
        other = draw(st.sampled_from([s for s in subjects if s != subject] or list(subjects)))
        answer = draw(st.sampled_from(relation.candidates))
        neighborhood = (Neighbor(relation.template.replace("{}", other), answer),)
    return Fact(id=f"{subject}/{relation.id}", subject=subject, relation=relation, target_true=true,
                target_new=new, neighborhood=neighborhood)


def _edit(fact: Fact, edit_id: str, timestamp: datetime.datetime, *, true: str | None, new: str,
          paraphrases: bool, chain: ChainLink | None = None) -> Edit:
    r = fact.relation
    return Edit(
        id=edit_id, timestamp=timestamp, subject=fact.subject, relation_id=r.id, prompt=r.template,
        target_new=new, target_true=true,
        paraphrases=tuple(p.replace("{}", fact.subject) for p in r.paraphrases) if paraphrases else (),
        neighborhood=fact.neighborhood, candidates=r.candidates, chain=chain,
    )


@st.composite
def edits(draw, edit_id: str = "e0", timestamp: datetime.datetime = _EPOCH) -> Edit:
    """A valid :class:`streams.Edit`: ``{}`` template, distinct non-empty targets, optional paraphrases/neighbors."""
    fact = draw(facts())
    true = fact.target_true if draw(st.booleans()) else None
    return _edit(fact, edit_id, timestamp, true=true, new=fact.target_new, paraphrases=draw(st.booleans()))


@st.composite
def edit_streams(draw, *, min_edits: int = 1, max_edits: int = 4, max_batch: int = 2, rounds: bool = True,
                 conflicts: bool = True) -> EditStream:
    """An :class:`EditStream` of ``min_edits``..``max_edits`` edits in steps of 1..``max_batch`` edits, one day apart.

    With ``rounds``, it may contain round edits (o → o* at one step, o* → o at a later one,
    same subject and relation; roles ``round-out``/``round-back``); with ``conflicts``,
    conflict chains (o → o1* then o1* → o2* on the same subject and relation; roles
    ``conflict-e1``/``conflict-e2``). A chain's second edit is always in a later step.
    """
    kinds = ["plain"] + (["round"] if rounds else []) + (["conflict"] if conflicts else [])
    if not 1 <= min_edits <= max_edits:
        raise ValueError(f"need 1 <= min_edits <= max_edits, got {min_edits} and {max_edits}")
    wanted = draw(st.lists(st.sampled_from(kinds), min_size=min_edits, max_size=max_edits))
    # Episodes: each is a list of (fact, true, new, role) in the order they must happen.
    episodes, budget = [], max_edits
    for n, kind in enumerate(wanted):
        if budget == 0:
            break
        if budget == 1:  # a chain does not fit any more: a plain edit instead
            kind = "plain"
        size = 1 if kind == "plain" else 2
        budget -= size
        fact = draw(facts())
        if kind == "plain":
            episodes.append([(fact, fact.target_true, fact.target_new, None)])
        elif kind == "round":
            episodes.append([(fact, fact.target_true, fact.target_new, "round-out"),
                             (fact, fact.target_new, fact.target_true, "round-back")])
        else:
            second = draw(st.sampled_from([o for o in fact.relation.candidates if o != fact.target_new]))
            episodes.append([(fact, fact.target_true, fact.target_new, "conflict-e1"),
                             (fact, fact.target_new, second, "conflict-e2")])
    # Order: every episode's first edit in drawn order; each second edit goes after its first.
    order: list[tuple[int, int]] = [(i, 0) for i in range(len(episodes))]
    for i, episode in enumerate(episodes):
        if len(episode) == 2:
            first = order.index((i, 0))
            at = draw(st.integers(first + 1, len(order)))
            order.insert(at, (i, 1))
    # Steps: an edit may join the previous step unless that step is full or holds its chain's first edit.
    out, step, in_step = [], 0, []
    paraphrases = draw(st.booleans())
    for n, (i, part) in enumerate(order):
        joins = bool(in_step) and len(in_step) < max_batch and (i, 0) not in in_step and draw(st.booleans())
        if not joins:
            step, in_step = step + 1, []
        in_step.append((i, part))
        fact, true, new, role = episodes[i][part]
        chain = ChainLink(f"c{i}", role) if role else None
        out.append(_edit(fact, f"e{n}", _EPOCH + datetime.timedelta(days=step - 1), true=true, new=new,
                         paraphrases=paraphrases, chain=chain))
    return EditStream(out, name="hypothesis")




def tiny_model_specs(families: Sequence[str] = ("tiny-llama", "tiny-gpt2"), seeds: Sequence[int] = (0,)):
    """Model specs ``tiny-llama:SEED`` / ``tiny-gpt2:SEED`` that :func:`lifelong.models.load_model` understands."""
    return st.sampled_from([f"{f}:{s}" if s else f for f in families for s in seeds])


def tiny_models(families: Sequence[str] = ("tiny-llama", "tiny-gpt2"), seeds: Sequence[int] = (0,)):
    """Freshly loaded seeded tiny models (a new :class:`LoadedModel` per draw, so edits never leak)."""
    return tiny_model_specs(families, seeds).map(fresh_model)


def fresh_model(spec: str = "tiny-llama") -> LoadedModel:
    """A freshly loaded model (``tiny-llama``, ``tiny-gpt2``, ``tiny-llama:SEED``, or any load_model spec)."""
    return load_model(spec)


def format_stream(stream: Iterable[Edit]) -> str:
    """One line per edit: step date, id, chain role, prompt, old -> new target."""
    lines = []
    for e in stream:
        chain = f" [{e.chain.role} {e.chain.chain_id}]" if e.chain else ""
        extra = []
        if e.paraphrases:
            extra.append(f"paraphrases={list(e.paraphrases)}")
        if e.neighborhood:
            extra.append("neighbors=" + str([(n.prompt, n.answer) for n in e.neighborhood]))
        lines.append(f"  {e.timestamp:%Y-%m-%d} {e.id}{chain}: {e.rendered_prompt!r}: "
                     f"{e.target_true!r} -> {e.target_new!r}" + (" " + " ".join(extra) if extra else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Invariants


class InvariantViolation(AssertionError):
    """An invariant that does not hold; the message says which parameter/value and by how much."""


@dataclass(frozen=True)
class Invariant:
    """A named property of an editor, checked on one drawn example (an edit stream).

    ``check(subject, stream)`` raises (an :class:`InvariantViolation`, or any error) when
    the property fails; ``examples(max_edits)`` makes the hypothesis strategy of streams it is given.
    """

    name: str
    check: Callable[["EditorUnderTest", EditStream], None]
    description: str = ""
    examples: Callable[[int], st.SearchStrategy] = lambda max_edits: edit_streams(max_edits=max_edits)
    """Given the largest stream size wanted, the strategy of example streams."""


@dataclass
class EditorUnderTest:
    """What an invariant needs: fresh models, fresh editors, seeded steps."""

    factory: Callable[[], Editor]
    model: str = "tiny-llama"
    seed: int = 0

    def fresh_model(self) -> LoadedModel:
        return load_model(self.model)

    def fresh_editor(self, lm: LoadedModel) -> Editor:
        editor = self.factory()
        if not isinstance(editor, Editor):
            raise TypeError(f"editor_factory returned {type(editor).__name__}, not a lifelong Editor")
        editor.bind(lm)
        return editor

    def apply(self, editor: Editor, lm: LoadedModel, batch: Sequence[Edit], step: int) -> Delta:
        """One step, with torch seeded from (seed, step) exactly as the replay loop does."""
        from lifelong.replay import step_seed

        torch.manual_seed(step_seed(self.seed, step))
        delta = editor.apply(lm, batch)
        if not isinstance(delta, Delta):
            raise InvariantViolation(f"apply returned {type(delta).__name__}, not a Delta")
        return delta

    def replay(self, stream: EditStream, workdir: Path, run_name: str, *,
               lm: LoadedModel | None = None, stop_after: int | None = None, editor: Editor | None = None):
        """The real replay loop with ``editor`` or a fresh one from the factory (registered or not)."""
        from lifelong.replay import replay
        from lifelong.run import RunConfig

        path = workdir / "stream.jsonl"
        if not path.exists():
            stream.to_jsonl(path)
        lm = lm or self.fresh_model()
        editor = editor or self.fresh_editor(lm)
        config = RunConfig(model=self.model, editor=editor.name, stream=str(path), probe_every=1, seed=self.seed)
        return replay(config, workdir / run_name, lm=lm, editor=editor, progress=False, stop_after=stop_after)


def _snapshot(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _differences(expected: dict[str, torch.Tensor], model, names: Iterable[str] | None = None) -> list[str]:
    """Names (with the largest absolute difference) of parameters not bitwise equal to ``expected``."""
    params = dict(model.named_parameters())
    out = []
    for name in names if names is not None else expected:
        a, b = expected[name], params[name].detach()
        if a.shape != b.shape or not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else float("nan")
            out.append(f"{name} (max |diff| {diff:.3g})")
    return out


def _fail_if(problems: list[str], what: str) -> None:
    if problems:
        shown = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InvariantViolation(f"{what}: {shown}")


def revert_restores_base(subject: EditorUnderTest, stream: EditStream) -> None:
    """After any steps, DeltaStore.revert_to_base and checkout(0) give back θ0 bitwise (every parameter)."""
    lm = subject.fresh_model()
    editor = subject.fresh_editor(lm)
    base = _snapshot(lm)
    with tempfile.TemporaryDirectory(prefix="lifelong-kit-") as tmp:
        store = DeltaStore.for_scope(Path(tmp), lm.model, editor.scope(lm))
        for step, batch in enumerate(stream.steps(), start=1):
            store.commit(step, subject.apply(editor, lm, batch, step), editor.step_state())
        store.revert_to_base(lm.model)
        _fail_if(_differences(base, lm.model), "revert_to_base did not restore θ0 bitwise")
        store.checkout(lm.model, len(stream.steps()))
        store.checkout(lm.model, 0)
        _fail_if(_differences(base, lm.model), "checkout(0) did not restore θ0 bitwise")


def checkout_equals_live(subject: EditorUnderTest, stream: EditStream) -> None:
    """checkout(run, k) rebuilt from base + deltas equals the live model after k replayed steps (bitwise),
    and scores the stream's prompts as the live model and editor do (adaptors, prompt memories)."""
    from lifelong.replay import checkout, scorer_for
    from probes import Scorer

    steps = len(stream.steps())
    with tempfile.TemporaryDirectory(prefix="lifelong-kit-") as tmp:
        lm = subject.fresh_model()
        editor = subject.fresh_editor(lm)
        subject.replay(stream, Path(tmp), "run", lm=lm, editor=editor)
        live = _snapshot(lm)
        rebuilt = checkout(Path(tmp) / "run", steps)
        _fail_if(_differences(live, rebuilt.model), f"checkout({steps}) differs from the live model at step {steps}")
        pairs = [(p, e.target_new) for e in stream for p in (e.rendered_prompt, *e.paraphrases)]
        pairs += [(n.prompt, n.answer) for e in stream for n in e.neighborhood]
        want = Scorer(lm.model, lm.tokenizer, rewrite=editor.prompt_rewriter(lm)).score(pairs).nll
        got = scorer_for(rebuilt).score(pairs).nll
        if rebuilt.editor is not None:
            rebuilt.editor.release()
        if not (want == got).all():
            raise InvariantViolation(f"checkout({steps}) scores the stream's prompts differently from the live "
                                     f"model (max |Δnll| {abs(want - got).max():.3g})")
        base = checkout(Path(tmp) / "run", 0)
        _fail_if(_differences(_snapshot(subject.fresh_model()), base.model), "checkout(0) differs from θ0")


def empty_batch_is_noop(subject: EditorUnderTest, stream: EditStream) -> None:
    """apply(lm, []) returns an empty Delta and leaves every parameter bitwise as it was (also mid-stream)."""
    lm = subject.fresh_model()
    editor = subject.fresh_editor(lm)
    first = stream.steps()[0]
    for step, batch in enumerate([(), first, ()], start=1):
        before = _snapshot(lm)
        delta = subject.apply(editor, lm, batch, step)
        if batch:
            continue
        if delta or delta.changes:
            raise InvariantViolation(f"an empty batch returned a non-empty Delta for {sorted(delta.changes)}")
        _fail_if(_differences(before, lm.model), "an empty batch changed parameters")


def deterministic(subject: EditorUnderTest, stream: EditStream) -> None:
    """Two fresh models and editors, the same seed and edits -> bitwise equal deltas and weights."""
    runs = []
    for _ in range(2):
        lm = subject.fresh_model()
        editor = subject.fresh_editor(lm)
        deltas = [subject.apply(editor, lm, batch, step) for step, batch in enumerate(stream.steps(), start=1)]
        runs.append((lm, deltas))
    (lm_a, deltas_a), (lm_b, deltas_b) = runs
    for step, (a, b) in enumerate(zip(deltas_a, deltas_b), start=1):
        if sorted(a.changes) != sorted(b.changes):
            raise InvariantViolation(f"step {step}: deltas touch different parameters: "
                                     f"{sorted(a.changes)} vs {sorted(b.changes)}")
        for name in a.changes:
            x, y = a.changes[name].materialize(), b.changes[name].materialize()
            if not torch.equal(x, y):
                raise InvariantViolation(f"step {step}: delta of {name} differs between two identical runs "
                                         f"(max |diff| {(x.double() - y.double()).abs().max().item():.3g})")
    _fail_if(_differences(_snapshot(lm_a), lm_b.model), "two identical runs end with different weights")


def scope_respected(subject: EditorUnderTest, stream: EditStream) -> None:
    """Parameters outside editor.scope(lm) stay bitwise unchanged; deltas name only scoped parameters."""
    lm = subject.fresh_model()
    editor = subject.fresh_editor(lm)
    scope = set(editor.scope(lm))
    unknown = scope - set(dict(lm.model.named_parameters()))
    if unknown:
        raise InvariantViolation(f"scope names parameters the model does not have: {sorted(unknown)}")
    base = _snapshot(lm)
    outside = [n for n in base if n not in scope]
    for step, batch in enumerate(stream.steps(), start=1):
        delta = subject.apply(editor, lm, batch, step)
        extra = sorted(set(delta.changes) - scope)
        if extra:
            raise InvariantViolation(f"step {step}: the delta names parameters outside the scope: {extra}")
        _fail_if(_differences(base, lm.model, outside), f"step {step}: parameters outside the scope changed")


def delta_matches_change(subject: EditorUnderTest, stream: EditStream) -> None:
    """After every step, live weights == weights before the step + the returned Delta (bitwise)."""
    lm = subject.fresh_model()
    editor = subject.fresh_editor(lm)
    for step, batch in enumerate(stream.steps(), start=1):
        before = _snapshot(lm)
        delta = subject.apply(editor, lm, batch, step)
        expected = dict(before)
        for name, change in delta.changes.items():
            if name not in expected:
                raise InvariantViolation(f"step {step}: the delta names an unknown parameter {name}")
            value = expected[name].clone()
            value.add_(change.materialize().to(device=value.device, dtype=value.dtype))  # as Delta.apply does
            expected[name] = value
        _fail_if(_differences(expected, lm.model),
                 f"step {step}: the live weights are not the weights before + the returned Delta")


def resume_same_results(subject: EditorUnderTest, stream: EditStream) -> None:
    """A replay killed after k steps and resumed (fresh model, fresh editor) ends with the same results."""
    steps = len(stream.steps())
    with tempfile.TemporaryDirectory(prefix="lifelong-kit-") as tmp:
        work = Path(tmp)
        full = subject.replay(stream, work, "full")
        for k in range(1, steps):  # kill after every step in turn, each resume in a fresh process
            subject.replay(stream, work, "resumed", stop_after=1)
        resumed = subject.replay(stream, work, "resumed")
        cols = ["step", "probe", "metric", "protocol", "edit_id"]
        a = full.run.results().drop("run_id").sort(cols)
        b = resumed.run.results().drop("run_id").sort(cols)
        if not a.equals(b):
            detail = f"{a.height} rows vs {b.height}"
            if a.height == b.height:
                diff = [r for r, s in zip(a.iter_rows(), b.iter_rows()) if r != s]
                detail = f"{len(diff)} rows differ, first: {diff[0]}"
            raise InvariantViolation(f"the resumed run's results differ from the uninterrupted run's ({detail})")


METRIC_BOUNDS: dict[str, tuple[float, float]] = {
    **{m: (0.0, 1.0) for m in ("efficacy", "generalization", "locality", "retention", "superseded",
                               "retained_fraction", "round_success", "ignore_rate", "failure_rate", "conflict_score")},
    **{m: (0.0, math.log(2)) for m in ("distortion", "js", "js_divergence")},
}
"""The range of every bounded metric by name; metrics not listed here are not checked."""


def metric_bounds(subject: EditorUnderTest, stream: EditStream) -> None:
    """Every bounded score in the results is in range (fractions in [0, 1], JS distortion in [0, ln 2])."""
    with tempfile.TemporaryDirectory(prefix="lifelong-kit-") as tmp:
        lm = subject.fresh_model()
        done = subject.replay(stream, Path(tmp), "run", lm=lm)
        results = done.run.results()
        bad = []
        for probe, metric, protocol, edit_id, step, value in results.select(
                "probe", "metric", "protocol", "edit_id", "step", "value").iter_rows():
            low, high = METRIC_BOUNDS.get(metric, (-math.inf, math.inf))
            if metric in METRIC_BOUNDS and not (value is not None and low - 1e-12 <= value <= high + 1e-12):
                bad.append(f"{probe}/{metric}/{protocol} edit {edit_id} step {step} = {value} not in [{low}, {high}]")
        _fail_if(bad, "scores out of range")
        _check_distortion(subject, stream, lm)


def _check_distortion(subject: EditorUnderTest, stream: EditStream, live: LoadedModel) -> None:
    """0 ≤ JS(q_θb ‖ q_θ0) ≤ ln 2 on each edit's candidates, IR in [0, 1] for round edits."""
    import numpy as np

    from probes.distortion import ignore_rate, js_divergence

    from probes import Scorer

    base = subject.fresh_model()
    for edit in stream:
        if len(edit.candidates) < 2:
            continue
        pairs = [(edit.rendered_prompt, o) for o in edit.candidates]
        q = [Scorer(m.model, m.tokenizer).score(pairs).prob for m in (live, base)]
        q = [np.asarray(p, dtype=float) / np.sum(p) for p in q]
        value = float(js_divergence(q[0], q[1]))
        if not (-1e-12 <= value <= math.log(2) + 1e-12):
            raise InvariantViolation(f"js_divergence = {value} not in [0, ln 2] for edit {edit.id}")
        if edit.chain is not None and edit.chain.role == "round-back":
            others = [k for k, o in enumerate(edit.candidates) if o not in (edit.target_new, edit.target_true)]
            if others:
                rate = float(ignore_rate(q[1][others], q[0][others]))
                if not (0 <= rate <= 1):
                    raise InvariantViolation(f"ignore_rate = {rate} not in [0, 1] for round edit {edit.id}")


def rome_writes_key_value(subject: EditorUnderTest, stream: EditStream) -> None:
    """ROME/r-ROME: after apply, the edited projection maps the edit's key k to v*: ‖W'k + b − v*‖/‖v*‖ < 1e-4."""
    lm = subject.fresh_model()
    editor = subject.fresh_editor(lm)
    layer = editor.params.layer
    for step, edit in enumerate(stream, start=1):  # one edit per step: the equation holds for the last one
        from lifelong.replay import step_seed

        torch.manual_seed(step_seed(subject.seed, step))  # the seed apply will see: the same v*
        _, _, key, value = editor.rank_one(lm, edit)
        subject.apply(editor, lm, [edit], step)
        weight = lm.adapter.out_proj_weight_view(layer).double()
        bias = lm.adapter.out_proj(layer).bias
        out = weight @ key + (bias.double() if bias is not None else 0)
        err = ((out - value).norm() / value.norm()).item()
        if not err < 1e-4:
            raise InvariantViolation(f"edit {edit.id}: ‖W'k + b − v*‖/‖v*‖ = {err:.3g} ≥ 1e-4")


def alphaedit_preserves_nullspace_outputs(subject: EditorUnderTest, stream: EditStream) -> None:
    """AlphaEdit: each step's change maps the preserved keys (C's eigenvectors outside the
    null space, by the editor's nullspace_rule) to ~0, so outputs on preserved knowledge stay unchanged."""
    lm = subject.fresh_model()
    editor = subject.fresh_editor(lm)
    for step, batch in enumerate(stream.steps(), start=1):
        delta = subject.apply(editor, lm, batch, step)
        for layer in editor.layers(lm):
            values, vectors = torch.linalg.eigh(editor.second_moment(lm, layer))
            preserved = vectors[:, ~editor.null_directions(values)]
            change = delta.changes[lm.adapter.out_proj_param_name(layer)].materialize().double()
            change = change.T if lm.adapter.spec.transposed else change  # (out, in)
            leak = ((change @ preserved).norm() / (change.norm() * preserved.norm() + 1e-300)).item()
            if not leak < 1e-6:
                raise InvariantViolation(f"step {step}, layer {layer}: ‖ΔW·K₀‖/(‖ΔW‖‖K₀‖) = {leak:.3g} ≥ 1e-6")


def _invariant(fn: Callable, examples: Callable[[int], st.SearchStrategy] | None = None) -> Invariant:
    doc = (fn.__doc__ or "").strip().splitlines()[0]
    return Invariant(fn.__name__, fn, doc, examples) if examples else Invariant(fn.__name__, fn, doc)


def _several_steps(max_edits: int) -> st.SearchStrategy:
    """Streams of at least two steps (one edit each), so that there is a step to kill or check out."""
    return edit_streams(min_edits=2, max_edits=max(2, max_edits), max_batch=1)


INVARIANTS: dict[str, Invariant] = {inv.name: inv for inv in (
    _invariant(revert_restores_base),
    _invariant(checkout_equals_live, _several_steps),
    _invariant(empty_batch_is_noop),
    _invariant(deterministic),
    _invariant(scope_respected),
    _invariant(delta_matches_change),
    _invariant(resume_same_results, _several_steps),
    _invariant(metric_bounds),
)}
"""The generic invariants every editor must satisfy, by name."""

EQUATIONS: dict[type, dict[str, Invariant]] = {}
"""Editor-specific equation checks: editor class -> {name: Invariant}; subclasses inherit them."""


def register_equation(editor_cls: type, invariant: Invariant) -> Invariant:
    """Register an equation check for ``editor_cls`` (and its subclasses); returns the invariant."""
    EQUATIONS.setdefault(editor_cls, {})[invariant.name] = invariant
    return invariant


def _register_builtin_equations() -> None:
    from lifelong.editors.rome import ROMEEditor

    register_equation(ROMEEditor, _invariant(
        rome_writes_key_value, lambda max_edits: edit_streams(max_edits=max_edits, max_batch=1, conflicts=False)))
    from lifelong.editors.memit import AlphaEditEditor

    register_equation(AlphaEditEditor, _invariant(alphaedit_preserves_nullspace_outputs))


_register_builtin_equations()


def invariants_for(editor: Editor) -> dict[str, Invariant]:
    """The equation checks that apply to ``editor``: registered for its class (or a base), or its own."""
    out: dict[str, Invariant] = {}
    for cls in reversed(type(editor).__mro__):
        out.update(EQUATIONS.get(cls, {}))
    own = getattr(editor, "testing_invariants", None)
    if callable(own):
        out.update({inv.name: inv for inv in own()})
    return out


# --------------------------------------------------------------------------------------------
# Running the checks


@dataclass
class Failure:
    """One invariant that failed: its name, the error, and the minimal (shrunk) example."""

    invariant: str
    message: str
    example: str
    stream: EditStream | None = None

    def __str__(self) -> str:
        return f"FAILED {self.invariant}: {self.message}\n  minimal example:\n{self.example}"


@dataclass
class Report:
    """What :func:`check_editor` found: ``ok``, ``failures``, and what passed or did not apply."""

    editor: str
    model: str
    passed: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failed(self) -> list[str]:
        return [f.invariant for f in self.failures]

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        head = f"check_editor({self.editor} on {self.model}): {len(self.passed)} passed, {len(self.failures)} failed"
        if self.skipped:
            head += f", {len(self.skipped)} skipped"
        lines = [head]
        lines += [f"  ok     {name}" for name in self.passed]
        lines += [f"  skip   {name}" for name in self.skipped]
        lines += [str(f) for f in self.failures]
        return "\n".join(lines)

    def raise_if_failed(self) -> "Report":
        if self.failures:
            raise AssertionError(str(self))
        return self


def _select(invariants, editor: Editor) -> tuple[list[Invariant], list[str]]:
    equations = invariants_for(editor)
    if invariants is None:
        return list(INVARIANTS.values()) + list(equations.values()), []
    chosen, skipped = [], []
    known = {**INVARIANTS, **{n: i for cls in EQUATIONS.values() for n, i in cls.items()}}
    for item in invariants:
        if isinstance(item, Invariant):
            chosen.append(item)
        elif item in INVARIANTS or item in equations:
            chosen.append(INVARIANTS.get(item) or equations[item])
        elif item in known:
            skipped.append(f"{item} (does not apply to {type(editor).__name__})")
        else:
            raise ValueError(f"unknown invariant '{item}': expected one of {', '.join(sorted(known))}")
    return chosen, skipped


def check_editor(editor_factory: Callable[[], Editor], *, model: str = "tiny-llama",
                 invariants: Sequence[str | Invariant] | None = None, max_examples: int = 5, max_edits: int = 3,
                 seed: int = 0, shrink: bool = True) -> Report:
    """Check the editors ``editor_factory()`` makes against ``invariants`` (all that apply by default).

    Each invariant is a hypothesis property over drawn edit streams, run on fresh copies
    of ``model`` (a :func:`lifelong.models.load_model` spec) with ``max_examples`` examples of
    at most ``max_edits`` edits;
    ``seed`` fixes both hypothesis's draws and torch's per-step seeds. A failing example is
    shrunk to a minimal stream (``shrink=False`` skips that) and printed in the report.
    """
    probe = editor_factory()
    if not isinstance(probe, Editor):
        raise TypeError(f"editor_factory must return a lifelong Editor, got {type(probe).__name__}")
    chosen, skipped = _select(invariants, probe)
    label = getattr(probe, "name", type(probe).__name__)
    report = Report(editor=f"{label} ({type(probe).__name__})", model=model, skipped=skipped)
    subject = EditorUnderTest(editor_factory, model, seed)
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    for inv in chosen:
        failure = _run_invariant(inv, subject, max_examples, max_edits, seed, phases)
        if failure is None:
            report.passed.append(inv.name)
        else:
            report.failures.append(failure)
    return report


def _run_invariant(inv: Invariant, subject: EditorUnderTest, max_examples: int, max_edits: int, seed: int,
                   phases: list) -> Failure | None:
    last: dict = {}

    @hypothesis_seed(seed)
    @settings(max_examples=max_examples, deadline=None, database=None, phases=phases, verbosity=Verbosity.quiet,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(inv.examples(max_edits))
    def property_(stream):
        try:
            inv.check(subject, stream)
        except Exception as err:  # the last one recorded is the shrunk example's (hypothesis replays it last)
            last["stream"], last["error"] = stream, err
            raise

    try:
        property_()
    except Exception as err:  # hypothesis re-raises the minimal example's error (or a Flaky/group of them)
        stream, error = last.get("stream"), last.get("error", err)
        message = str(error) if isinstance(error, InvariantViolation) else f"{type(error).__name__}: {error}"
        if error is not err and not isinstance(err, type(error)):
            message += f" ({type(err).__name__} from hypothesis)"
        example = format_stream(stream) if stream is not None else "  (none recorded)"
        return Failure(inv.name, message.splitlines()[0] if message else type(error).__name__, example, stream)
    return None
