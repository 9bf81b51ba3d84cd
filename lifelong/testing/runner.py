"""Running the checks: :func:`check_editor` runs each invariant as a hypothesis property and
collects a :class:`Report`, with a shrunk failing stream for each failure."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from lifelong.editors.base import Editor
from lifelong.testing._requires import hypothesis
from lifelong.testing.equations import EQUATIONS, invariants_for
from lifelong.testing.invariants import INVARIANTS, EditorUnderTest, Invariant, InvariantViolation
from streams import Edit, EditStream


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
        lines.append(
            f"  {e.timestamp:%Y-%m-%d} {e.id}{chain}: {e.rendered_prompt!r}: "
            f"{e.target_true!r} -> {e.target_new!r}" + (" " + " ".join(extra) if extra else "")
        )
    return "\n".join(lines)


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

    def raise_if_failed(self) -> Report:
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


def check_editor(
    editor_factory: Callable[[], Editor],
    *,
    model: str = "tiny-llama",
    invariants: Sequence[str | Invariant] | None = None,
    max_examples: int = 5,
    max_edits: int = 3,
    seed: int = 0,
    shrink: bool = True,
) -> Report:
    """Check the editors ``editor_factory()`` makes against ``invariants`` (all that apply by default).

    Each invariant is a hypothesis property over drawn edit streams, run on fresh copies
    of ``model`` (a :func:`lifelong.core.models.load_model` spec) with ``max_examples`` examples of
    at most ``max_edits`` edits;
    ``seed`` fixes both hypothesis's draws and torch's per-step seeds. A failing example is
    shrunk to a minimal stream (``shrink=False`` skips that) and printed in the report.
    """
    Phase = hypothesis().Phase  # first: without the extra, say which one before anything runs
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


def _run_invariant(
    inv: Invariant, subject: EditorUnderTest, max_examples: int, max_edits: int, seed: int, phases: list
) -> Failure | None:
    hyp = hypothesis()
    last: dict = {}

    @hyp.seed(seed)
    @hyp.settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=phases,
        verbosity=hyp.Verbosity.quiet,
        suppress_health_check=list(hyp.HealthCheck),
        print_blob=False,
    )
    @hyp.given(inv.examples(max_edits))
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
