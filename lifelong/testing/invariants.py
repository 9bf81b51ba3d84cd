"""The generic invariants every editor must satisfy (:data:`INVARIANTS`) and what they run on.

Each invariant is ``check(subject, stream)``: it raises (an :class:`InvariantViolation`, or any
error) when the property fails on that stream. None of this imports hypothesis: the strategy
an invariant draws its streams from is built only when :func:`lifelong.testing.check_editor` runs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lifelong.core.delta import Delta, DeltaStore
from lifelong.core.models import LoadedModel, load_model
from lifelong.editors.base import Editor
from probes.metric_table import CHAINS, DISTORTION_JS, IGNORE_RATE, METRICS, out_of_range
from streams import Edit, EditStream

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy


def fresh_model(spec: str = "tiny-llama") -> LoadedModel:
    """A freshly loaded model (``tiny-llama``, ``tiny-gpt2``, ``tiny-llama:SEED``, or any load_model spec)."""
    return load_model(spec)


def _any_streams(max_edits: int) -> SearchStrategy:
    from lifelong.testing.strategies import edit_streams

    return edit_streams(max_edits=max_edits)


def _several_steps(max_edits: int) -> SearchStrategy:
    """Streams of at least two steps (one edit each), so that there is a step to kill or check out."""
    from lifelong.testing.strategies import edit_streams

    return edit_streams(min_edits=2, max_edits=max(2, max_edits), max_batch=1)


class InvariantViolation(AssertionError):
    """An invariant that does not hold; the message says which parameter/value and by how much."""


@dataclass(frozen=True)
class Invariant:
    """A named property of an editor, checked on one drawn example (an edit stream).

    ``check(subject, stream)`` raises (an :class:`InvariantViolation`, or any error) when
    the property fails; ``examples(max_edits)`` makes the hypothesis strategy of streams it is given.
    """

    name: str
    check: Callable[[EditorUnderTest, EditStream], None]
    description: str = ""
    examples: Callable[[int], SearchStrategy] = _any_streams
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

    def replay(
        self,
        stream: EditStream,
        workdir: Path,
        run_name: str,
        *,
        lm: LoadedModel | None = None,
        stop_after: int | None = None,
        editor: Editor | None = None,
        probes: Sequence[str] = (),
    ):
        """The real replay loop with ``editor`` or a fresh one from the factory (registered or not), the
        default probes and ``probes``."""
        from lifelong.replay import replay
        from lifelong.run import RunConfig

        path = workdir / "stream.jsonl"
        if not path.exists():
            stream.to_jsonl(path)
        lm = lm or self.fresh_model()
        editor = editor or self.fresh_editor(lm)
        config = RunConfig(
            model=self.model, editor=editor.name, stream=str(path), probe_every=1, seed=self.seed, probes=list(probes)
        )
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
    from lifelong.core.scorer import Scorer
    from lifelong.replay import checkout, scorer_for

    steps = len(stream.steps())
    with tempfile.TemporaryDirectory(prefix="lifelong-kit-") as tmp:
        lm = subject.fresh_model()
        editor = subject.fresh_editor(lm)
        subject.replay(stream, Path(tmp), "run", lm=lm, editor=editor)
        live = _snapshot(lm)
        rebuilt = checkout(Path(tmp) / "run", steps, editor_class=type(editor))
        _fail_if(_differences(live, rebuilt.model), f"checkout({steps}) differs from the live model at step {steps}")
        pairs = [(p, e.target_new) for e in stream for p in (e.rendered_prompt, *e.paraphrases)]
        pairs += [(n.prompt, n.answer) for e in stream for n in e.neighborhood]
        want = Scorer(lm.model, lm.tokenizer, rewrite=editor.prompt_rewriter(lm)).score(pairs).nll
        got = scorer_for(rebuilt).score(pairs).nll
        if rebuilt.editor is not None:
            rebuilt.editor.release()
        if not (want == got).all():
            raise InvariantViolation(
                f"checkout({steps}) scores the stream's prompts differently from the live "
                f"model (max |Δnll| {abs(want - got).max():.3g})"
            )
        base = checkout(Path(tmp) / "run", 0, editor_class=type(editor))
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
            raise InvariantViolation(
                f"step {step}: deltas touch different parameters: {sorted(a.changes)} vs {sorted(b.changes)}"
            )
        for name in a.changes:
            x, y = a.changes[name].materialize(), b.changes[name].materialize()
            if not torch.equal(x, y):
                raise InvariantViolation(
                    f"step {step}: delta of {name} differs between two identical runs "
                    f"(max |diff| {(x.double() - y.double()).abs().max().item():.3g})"
                )
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
        _fail_if(
            _differences(expected, lm.model),
            f"step {step}: the live weights are not the weights before + the returned Delta",
        )


def resume_same_results(subject: EditorUnderTest, stream: EditStream) -> None:
    """A replay killed after k steps and resumed (fresh model, fresh editor) ends with the same results."""
    steps = len(stream.steps())
    with tempfile.TemporaryDirectory(prefix="lifelong-kit-") as tmp:
        work = Path(tmp)
        full = subject.replay(stream, work, "full")
        for _ in range(1, steps):  # kill after every step in turn, each resume in a fresh process
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


def metric_bounds(subject: EditorUnderTest, stream: EditStream) -> None:
    """Every score of a replay with the chain probe is in its range in probes.metric_table (fractions in
    [0, 1], JS distortion in [0, ln 2], ...), and JS distortion and IR recomputed on each edit's candidates are too."""
    with tempfile.TemporaryDirectory(prefix="lifelong-kit-") as tmp:
        lm = subject.fresh_model()
        # The drawn streams hold round and conflict chains: the chain probe scores them.
        done = subject.replay(stream, Path(tmp), "run", lm=lm, probes=[CHAINS])
        results = done.run.results()
        rows = results.select("probe", "metric", "protocol", "edit_id", "step", "value").iter_rows()
        _fail_if(out_of_range(rows), "scores out of range")
        _check_distortion(subject, stream, lm)


def _check_distortion(subject: EditorUnderTest, stream: EditStream, live: LoadedModel) -> None:
    """JS(q_θb ‖ q_θ0) on each edit's candidates, and IR for round edits, within the chain probe's ranges."""
    import numpy as np

    from lifelong.core.scorer import Scorer
    from probes.distortion import ignore_rate, js_divergence

    base = subject.fresh_model()
    for edit in stream:
        if len(edit.candidates) < 2:
            continue
        pairs = [(edit.rendered_prompt, o) for o in edit.candidates]
        q = [Scorer(m.model, m.tokenizer).score(pairs).prob for m in (live, base)]
        q = [np.asarray(p, dtype=float) / np.sum(p) for p in q]
        value = float(js_divergence(q[0], q[1]))
        if not METRICS[(CHAINS, DISTORTION_JS)].admits(value):
            raise InvariantViolation(f"js_divergence = {value} not in [0, ln 2] for edit {edit.id}")
        if edit.chain is not None and edit.chain.role == "round-back":
            others = [k for k, o in enumerate(edit.candidates) if o not in (edit.target_new, edit.target_true)]
            if others:
                rate = float(ignore_rate(q[1][others], q[0][others]))
                if not METRICS[(CHAINS, IGNORE_RATE)].admits(rate):
                    raise InvariantViolation(f"ignore_rate = {rate} not in [0, 1] for round edit {edit.id}")


def _invariant(fn: Callable, examples: Callable[[int], SearchStrategy] | None = None) -> Invariant:
    doc = (fn.__doc__ or "").strip().splitlines()[0]
    return Invariant(fn.__name__, fn, doc, examples) if examples else Invariant(fn.__name__, fn, doc)


INVARIANTS: dict[str, Invariant] = {
    inv.name: inv
    for inv in (
        _invariant(revert_restores_base),
        _invariant(checkout_equals_live, _several_steps),
        _invariant(empty_batch_is_noop),
        _invariant(deterministic),
        _invariant(scope_respected),
        _invariant(delta_matches_change),
        _invariant(resume_same_results, _several_steps),
        _invariant(metric_bounds),
    )
}
"""The generic invariants every editor must satisfy, by name."""
