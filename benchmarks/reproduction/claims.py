"""The reproduction's claims as data: benchmarks/claims.toml read into :class:`Claim` objects.

A claim names its arms (an editor with its settings, on a data set, so many items per seed at each
scale), its figures (each a quantity of one arm, or of an arm against a control arm) and its rule (each
figure's whole 95% interval above or below a threshold). Adding a claim is adding a ``[[claim]]`` table
to the file; the kinds of figure below are the only code, and a new kind is one entry of ``KINDS``.
A malformed claim is refused in one line naming the file and the claim.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from lifelong.core.stats import Estimate, over_seeds

from . import measures as m

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

SCALES = ("quick", "standard")
# The data sets an arm draws from (the readers' names): plain edits, or whole chains for the last three.
DATASETS = {
    "counterfact": "counterfact",  # the ROME sample of 500
    "counterfact-easyedit": "counterfact_easyedit",  # EasyEdit's split: 10,000 records
    "zsre": "zsre",
    "round": "pitfalls_round_easy",
    "reverse": "pitfalls_reverse",
    "composite": "pitfalls_composite",
}
CHAIN_SOURCES = ("round", "reverse", "composite")
# What an arm's units are: "seeds" (one run per seed, each on its own sample) or "chains" (each chain of
# the sample its own run from θ0, the weights put back after it, as the Pitfalls code applies them).
UNITS = ("seeds", "chains")
# Controls made from the chains themselves (runner.TRANSFORM_FUNCTIONS): the same chains, measured alike.
TRANSFORMS = {
    "noop-round": "each round chain o → o* → o as o → o → o (re-asserting o: the round trip without o*)",
    "unrelated-e2": "each conflict chain's e2 replaced by another chain's (an unrelated edit after e1)",
}


class ClaimsError(ValueError):
    """A claims file that cannot be read: one line naming the file and the claim."""


# ----------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    """One configuration of a claim; it runs once per seed, each seed on its own sample of items."""

    key: str  # short name, unique within the claim (the run directory's name)
    editor: str
    source: str | dict[str, str]  # a DATASETS key, or one by scale
    items: dict[str, int]  # items per seed by scale: edits, or chains for round/reverse/composite
    overrides: dict[str, str] = field(default_factory=dict)
    probes: tuple[str, ...] = ()
    probe_every: int = 5  # retention schedule
    batch: dict[str, int] | None = None  # edits per step by scale (None: one)
    units: str = "seeds"  # UNITS: "chains" runs each chain from θ0 as its own run
    transform: str = ""  # a TRANSFORMS key: the chains made into a control's

    def count(self, scale: str) -> int:
        """Items per seed at ``scale``; a scale of the form ``items=N`` gives every arm N (smoke tests)."""
        return int(scale.split("=", 1)[1]) if scale.startswith("items=") else self.items[scale]

    def source_at(self, scale: str) -> str:
        """The data set drawn from at ``scale`` (smoke tests, ``items=N``: the quick scale's)."""
        if isinstance(self.source, str):
            return self.source
        return self.source["quick" if scale.startswith("items=") else scale]

    def batch_at(self, scale: str) -> int | None:
        """Edits per step at ``scale`` (smoke tests, ``items=N``: the quick scale's)."""
        return None if self.batch is None else self.batch["quick" if scale.startswith("items=") else scale]


# ----------------------------------------------------------------------------- figures

Runs = dict[str, list[pl.DataFrame]]


@dataclass(frozen=True)
class Figure:
    """One row of a claim's table: ``kind`` of quantity, of ``arm`` (against ``control`` for the kinds
    that compare two arms, paired by seed)."""

    label: str
    kind: str
    arm: str
    control: str = ""
    probe: str = ""
    metric: str = ""
    protocol: str = "es"
    step: int | None = None  # perplexity: at this step (None: the last step the probe ran)
    count: str = ""  # chain: the metric whose rows count the chains (default: ``metric``'s)
    unit: str = ""  # what an item is ('edits', 'prompts', 'chains'): the items column says so many per seed
    note: str = ""

    def estimate(self, runs: Runs) -> tuple[str, Estimate, str]:
        """(label, estimate, what it is over) from the arms' runs."""
        estimate, note = KINDS[self.kind].compute(self, runs)
        return self.label, estimate, note


def _items(fig: Figure, runs: list[pl.DataFrame], values: Callable[[pl.DataFrame], np.ndarray]) -> str:
    return f"{m.items_per_seed(runs, values)} {fig.unit} per seed" if fig.unit else fig.note


def _one_seed(runs: list[pl.DataFrame], note: str, one: str) -> str:
    return "; ".join(x for x in (note, one) if x) if len(runs) == 1 else note


def _own_step(fig: Figure, runs: Runs) -> tuple[Estimate, str]:
    r = runs[fig.arm]
    e = m.per_seed(r, m.own_step_mean(fig.probe, fig.metric, fig.protocol), m.SHARE)  # ES/PS/NS, exact: shares
    return e, _items(fig, r, m.own_step_values(fig.probe, fig.metric, fig.protocol))


def _chain(fig: Figure, runs: Runs) -> tuple[Estimate, str]:
    r = runs[fig.arm]
    bounds = m.CHAIN_RANGES.get(fig.metric, (-math.inf, math.inf))
    return m.per_seed(r, m.chain_mean(fig.metric), bounds), _items(fig, r, m.chain_count(fig.count or fig.metric))


def _chain_units(fig: Figure, runs: Runs) -> tuple[Estimate, str]:
    return m.chain_unit_estimate(runs[fig.arm], fig.metric), fig.note or "n = chains, each its own run from θ0"


def _chain_units_difference(fig: Figure, runs: Runs) -> tuple[Estimate, str]:
    e = m.chain_unit_difference(runs[fig.arm], runs[fig.control], fig.metric)
    return e, fig.note or f"{fig.arm} − {fig.control}, paired by chain (each its own run from θ0)"


def _retained(fig: Figure, runs: Runs) -> tuple[Estimate, str]:
    r = runs[fig.arm]
    return m.retained_estimate(r, fig.protocol), _one_seed(r, fig.note, "one seed: interval over its edits")


def _perplexity_ratio(fig: Figure, runs: Runs) -> tuple[Estimate, str]:
    e = m.ratio_per_seed(runs[fig.arm], fig.step)
    return e, m.ratio_note(e, fig.note)


def _downstream_change(fig: Figure, runs: Runs) -> tuple[Estimate, str]:
    r = runs[fig.arm]
    values = [m.downstream_change(fig.protocol, fig.step)(run) for run in r]
    return over_seeds(values, bounds=(-1.0, 1.0)), _one_seed(r, fig.note, "one seed: no interval")


def _retained_difference(fig: Figure, runs: Runs) -> tuple[Estimate, str]:
    a, b = runs[fig.arm], runs[fig.control]
    e = m.retained_difference(a, b, fig.protocol)
    return e, ("one seed: Newcombe interval over the edits" if len(a) == 1 and len(b) == 1 else fig.note)


def _perplexity_ratio_between(fig: Figure, runs: Runs) -> tuple[Estimate, str]:
    e = m.paired_ratio(runs[fig.arm], runs[fig.control], fig.step)
    return e, m.ratio_note(e, fig.note)


@dataclass(frozen=True)
class Kind:
    compute: Callable[[Figure, Runs], tuple[Estimate, str]]
    required: tuple[str, ...]  # besides label, kind and arm
    optional: tuple[str, ...]
    meaning: str


KINDS = {
    "own_step": Kind(
        _own_step,
        ("probe", "metric", "protocol"),
        ("unit", "note"),
        "mean over a run's edits of probe/metric/protocol at each edit's own step (a share); t interval over "
        "seeds, cut to [0, 1]",
    ),
    "chain": Kind(
        _chain,
        ("metric",),
        ("count", "unit", "note"),
        "mean over chains of a chain metric at completion (failure_rate: after the last chain); over seeds",
    ),
    "chain_units": Kind(
        _chain_units,
        ("metric",),
        ("note",),
        "a chain metric at completion, one value per chain, each chain its own run from θ0 (an arm with "
        'units = "chains"); n = chains, Wilson for 0/1 figures, else a percentile bootstrap',
    ),
    "chain_units_difference": Kind(
        _chain_units_difference,
        ("metric", "control"),
        ("note",),
        "arm − control in a chain metric, paired by chain (the control: the same chains transformed, e.g. "
        "noop-round); n = chains, Newcombe's paired interval for 0/1 figures, else a percentile bootstrap",
    ),
    "retained": Kind(
        _retained,
        (),
        ("protocol", "note"),
        "fraction of edits still held at the last probed step (protocol es or exact); one seed: Wilson",
    ),
    "perplexity_ratio": Kind(
        _perplexity_ratio,
        (),
        ("step", "note"),
        "perplexity to θ0 at step (default: the last probed); geometric mean over seeds",
    ),
    "downstream_change": Kind(
        _downstream_change,
        ("protocol",),
        ("step", "note"),
        "downstream score − θ0's for protocol (a task or mean, e.g. mean;seed) at step (default: the last "
        "probed); t interval over seeds, within [-1, 1]",
    ),
    "retained_difference": Kind(
        _retained_difference,
        ("control",),
        ("protocol", "note"),
        "arm − control in retained fraction, paired by seed; one seed each: Newcombe over the edits",
    ),
    "perplexity_ratio_between": Kind(
        _perplexity_ratio_between,
        ("control",),
        ("step", "note"),
        "arm / control in perplexity ratio, paired by seed (one seed each: by chunk of the corpus)",
    ),
}


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Test:
    """One figure's whole interval against a threshold: 'yes', 'no', '?' (spans it) or 'n/a'."""

    figure: str
    threshold: float
    side: str  # "above" | "below"

    def read(self, figures: dict[str, Estimate]) -> str:
        e = figures[self.figure]
        return m.above(e, self.threshold) if self.side == "above" else m.below(e, self.threshold)


@dataclass(frozen=True)
class Rule:
    """The claim holds when every test of ``all_of`` says yes; with ``tested_when_any``, it is only
    judged once one of those says yes (else the verdict is ``untested``)."""

    text: str
    all_of: tuple[Test, ...]
    tested_when_any: tuple[Test, ...] = ()
    untested: str = ""

    def judge(self, figures: dict[str, Estimate]) -> tuple[str, str]:
        if self.tested_when_any:
            conditions = [t.read(figures) for t in self.tested_when_any]
            if "n/a" in conditions:
                return "not run", self.text
            if "yes" not in conditions:
                return self.untested, self.text
        return m.combine([t.read(figures) for t in self.all_of]), self.text


@dataclass(frozen=True)
class Claim:
    key: str
    title: str
    paper: str  # what the paper reports, with its source
    arms: tuple[Arm, ...]
    figures: tuple[Figure, ...]
    rule: Rule
    headline: tuple[str, ...] = ()  # the figures shown in the summary table (default: the first three)
    max_seeds: dict[str, int] = field(default_factory=dict)  # by scale: fewer seeds where one run takes hours
    cite: str = ""  # the paper's figure, short, for the summary table (default: ``paper`` up to its first colon)
    note: str = ""

    def measure(self, runs: Runs) -> list[tuple[str, Estimate, str]]:
        """Every figure, in the file's order, from the arms' runs (one per seed)."""
        return [fig.estimate(runs) for fig in self.figures]

    def judge(self, figures: dict[str, Estimate]) -> tuple[str, str]:
        """(verdict, the rule in words) from the figures by label."""
        return self.rule.judge(figures)


# ----------------------------------------------------------------------------- reading the file

CLAIM_KEYS = {"id", "title", "paper", "cite", "note", "headline", "max_seeds", "arm", "figures", "rule"}
ARM_KEYS = {"key", "editor", "source", "items", "overrides", "probes", "probe_every", "batch", "units", "transform"}
FIGURE_KEYS = {"label", "kind", "arm", "control", "probe", "metric", "protocol", "step", "count", "unit", "note"}
RULE_KEYS = {"text", "all_of", "tested_when_any", "untested"}
PLACEHOLDER = re.compile(r"\{(\w+)\}")


class _Reader:
    """Checks one claim's table, raising ClaimsError with the file and the claim in the message."""

    def __init__(self, path: Path, where: str, texts: dict[str, str], sizes: dict[str, dict[str, int]]):
        self.path, self.where, self.texts, self.sizes = path, where, texts, sizes

    def fail(self, problem: str) -> ClaimsError:
        return ClaimsError(f"{self.path}: {self.where}: {problem}")

    def keys(self, table: object, allowed: set[str], required: tuple[str, ...], what: str) -> dict:
        if not isinstance(table, dict):
            raise self.fail(f"{what} must be a table, not {table!r}")
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise self.fail(f"{what}: unknown key(s) {', '.join(unknown)}: expected {', '.join(sorted(allowed))}")
        missing = [k for k in required if k not in table]
        if missing:
            raise self.fail(f"{what}: missing {', '.join(missing)}")
        return table

    def text(self, value: object, what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{what} must be a string, not {value!r}")

        def fill(match: re.Match) -> str:
            name = match[1]
            if name not in self.texts:
                raise self.fail(f"{what}: no text named {{{name}}} (the [text] table has {', '.join(self.texts)})")
            return self.texts[name]

        return PLACEHOLDER.sub(fill, value)

    def by_scale(self, value: object, what: str) -> dict[str, int]:
        if isinstance(value, str):
            if value not in self.sizes:
                raise self.fail(f"{what} = {value!r}: no such entry in [sizes] ({', '.join(self.sizes)})")
            value = self.sizes[value]
        if not (
            isinstance(value, dict)
            and set(value) == set(SCALES)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value.values())
        ):
            raise self.fail(f"{what} must be a [sizes] name or {{quick = N, standard = N}} with N ≥ 1, not {value!r}")
        return dict(value)

    def arm(self, table: object, i: int) -> Arm:
        t = self.keys(table, ARM_KEYS, ("key", "editor", "source", "items"), f"arm {i + 1}")
        what = f"arm '{t['key']}'"
        from lifelong.core.names import EDITOR_CLASSES, unknown_setting

        editor = t["editor"]
        if not isinstance(editor, str) or (editor not in EDITOR_CLASSES and ":" not in editor):
            raise self.fail(f"{what}: editor {editor!r}: expected one of {', '.join(EDITOR_CLASSES)} or module:Class")
        source = t["source"]
        sources = [source] if isinstance(source, str) else list(source.values()) if isinstance(source, dict) else None
        if sources is None or (isinstance(source, dict) and set(source) != set(SCALES)):
            raise self.fail(f"{what}: source must be a data set or {{quick = …, standard = …}}, not {source!r}")
        bad = [s for s in sources if s not in DATASETS]
        if bad:
            raise self.fail(f"{what}: source {bad[0]!r}: expected one of {', '.join(DATASETS)}")
        overrides = t.get("overrides", {})
        if not isinstance(overrides, dict):
            raise self.fail(f"{what}: overrides must be a table of settings")
        for key in overrides:
            problem = unknown_setting(editor, key)
            if problem:
                raise self.fail(f"{what}: {problem}")
        probes = t.get("probes", [])
        if not (isinstance(probes, list) and all(isinstance(p, str) for p in probes)):
            raise self.fail(f"{what}: probes must be a list of probe specs")
        every = t.get("probe_every", 5)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise self.fail(f"{what}: probe_every must be an integer ≥ 1, not {every!r}")
        units, transform = t.get("units", "seeds"), t.get("transform", "")
        if units not in UNITS:
            raise self.fail(f"{what}: units {units!r}: expected one of {', '.join(UNITS)}")
        if transform and transform not in TRANSFORMS:
            raise self.fail(f"{what}: transform {transform!r}: expected one of {', '.join(TRANSFORMS)}")
        if (units == "chains" or transform) and not all(s in CHAIN_SOURCES for s in sources):
            raise self.fail(f"{what}: units 'chains' and transforms need a chain data set ({', '.join(CHAIN_SOURCES)})")
        return Arm(
            key=self.text(t["key"], "arm key"),
            editor=editor,
            source=source if isinstance(source, str) else dict(source),
            items=self.by_scale(t["items"], f"{what}: items"),
            overrides={k: self.text(str(v), f"{what}: overrides.{k}") for k, v in overrides.items()},
            probes=tuple(probes),
            probe_every=every,
            batch=None if "batch" not in t else self.by_scale(t["batch"], f"{what}: batch"),
            units=units,
            transform=transform,
        )

    def figure(self, table: object, arms: set[str], i: int) -> Figure:
        t = self.keys(table, FIGURE_KEYS, ("label", "kind", "arm"), f"figure {i + 1}")
        what = f"figure {t['label']!r}"
        kind = KINDS.get(t["kind"])
        if kind is None:
            raise self.fail(f"{what}: kind {t['kind']!r}: expected one of {', '.join(KINDS)}")
        extra = sorted(set(t) - {"label", "kind", "arm", *kind.required, *kind.optional})
        if extra:
            raise self.fail(f"{what}: a {t['kind']} figure takes no {', '.join(extra)}")
        missing = [k for k in kind.required if k not in t]
        if missing:
            raise self.fail(f"{what}: a {t['kind']} figure needs {', '.join(missing)}")
        for key in ("arm", "control"):
            if key in t and (not isinstance(t[key], str) or t[key] not in arms):
                raise self.fail(f"{what}: {key} {t[key]!r} is not an arm of the claim ({', '.join(sorted(arms))})")
        step = t.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise self.fail(f"{what}: step must be an integer ≥ 0, not {step!r}")
        strings = {k: self.text(t[k], f"{what}: {k}") for k in FIGURE_KEYS - {"step"} if k in t}
        return Figure(**strings, step=step)

    def tests(self, value: object, labels: set[str], what: str) -> tuple[Test, ...]:
        if not isinstance(value, list):
            raise self.fail(f"rule.{what} must be a list of {{figure = …, above|below = …}}")
        out = []
        for t in value:
            if not isinstance(t, dict) or set(t) not in ({"figure", "above"}, {"figure", "below"}):
                raise self.fail(f"rule.{what}: {t!r}: expected {{figure = …, above = x}} or {{figure = …, below = x}}")
            side = "above" if "above" in t else "below"
            threshold = t[side]
            if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
                raise self.fail(f"rule.{what}: {side} must be a number, not {threshold!r}")
            if t["figure"] not in labels:
                raise self.fail(f"rule.{what}: no figure labelled {t['figure']!r} in the claim")
            out.append(Test(t["figure"], float(threshold), side))
        return tuple(out)

    def claim(self, t: dict) -> Claim:
        self.keys(t, CLAIM_KEYS, ("id", "title", "paper", "arm", "figures", "rule"), "claim")
        if not isinstance(t["arm"], list) or not t["arm"]:
            raise self.fail("needs at least one [[claim.arm]]")
        arms = tuple(self.arm(a, i) for i, a in enumerate(t["arm"]))
        keys = [a.key for a in arms]
        if len(set(keys)) != len(keys):
            raise self.fail(f"two arms share a key ({', '.join(keys)})")
        if not isinstance(t["figures"], list) or not t["figures"]:
            raise self.fail("figures must be a non-empty list of {label = …, kind = …, arm = …}")
        figures = tuple(self.figure(f, set(keys), i) for i, f in enumerate(t["figures"]))
        labels = [f.label for f in figures]
        if len(set(labels)) != len(labels):
            raise self.fail(f"two figures share the label {next(x for x in labels if labels.count(x) > 1)!r}")
        rule = self.keys(t["rule"], RULE_KEYS, ("text", "all_of"), "rule")
        tested = self.tests(rule.get("tested_when_any", []), set(labels), "tested_when_any")
        if tested and "untested" not in rule:
            raise self.fail("rule: tested_when_any needs untested (the verdict while no condition holds)")
        all_of = self.tests(rule["all_of"], set(labels), "all_of")
        if not all_of:
            raise self.fail("rule.all_of must name at least one figure")
        headline = t.get("headline", [])
        if not isinstance(headline, list) or any(h not in labels for h in headline):
            raise self.fail(f"headline must list figure labels of the claim, not {headline!r}")
        max_seeds = t.get("max_seeds", {})
        if not isinstance(max_seeds, dict) or not all(
            k in SCALES and isinstance(v, int) and v >= 1 for k, v in max_seeds.items()
        ):
            raise self.fail(f"max_seeds must be {{quick|standard = N ≥ 1}}, not {max_seeds!r}")
        return Claim(
            key=t["id"],
            title=self.text(t["title"], "title"),
            paper=self.text(t["paper"], "paper"),
            arms=arms,
            figures=figures,
            rule=Rule(
                self.text(rule["text"], "rule.text"),
                all_of,
                tested,
                self.text(rule.get("untested", ""), "rule.untested"),
            ),
            headline=tuple(headline),
            max_seeds=dict(max_seeds),
            cite=self.text(t.get("cite", ""), "cite"),
            note=self.text(t.get("note", ""), "note"),
        )


def load_claims(path: Path, data: Path) -> tuple[Claim, ...]:
    """The claims of ``path`` in its order; ``{data}`` in a string is the data sets' directory and
    ``{name}`` a passage of the file's ``[text]`` table. ClaimsError (one line) for a malformed file."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as err:
        raise ClaimsError(f"{path}: cannot be read ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise ClaimsError(f"{path}: not valid TOML ({err})") from None
    unknown = sorted(set(raw) - {"text", "sizes", "claim"})
    if unknown:
        raise ClaimsError(f"{path}: unknown top-level key(s) {', '.join(unknown)}: expected text, sizes, claim")
    texts = raw.get("text", {})
    if not isinstance(texts, dict) or not all(isinstance(v, str) for v in texts.values()):
        raise ClaimsError(f"{path}: [text] must map names to strings")
    texts = {**texts, "data": str(data)}
    sizes = raw.get("sizes", {})
    if not isinstance(sizes, dict):
        raise ClaimsError(f"{path}: [sizes] must map names to {{quick = N, standard = N}}")
    table = raw.get("claim", [])
    if not isinstance(table, list) or not table:
        raise ClaimsError(f"{path}: no [[claim]] tables")
    claims: list[Claim] = []
    for i, t in enumerate(table):
        key = t.get("id") if isinstance(t, dict) else None
        where = f"claim {key!r}" if isinstance(key, str) else f"claim {i + 1}"
        reader = _Reader(path, where, texts, sizes)
        if isinstance(key, str) and not re.fullmatch(r"[\w-]+", key):
            raise reader.fail("id must be letters, digits, '_' or '-' (it is a --claims key)")
        for name, value in sizes.items():
            reader.by_scale(value, f"[sizes] {name}")
        claim = reader.claim(t)
        if any(c.key == claim.key for c in claims):
            raise reader.fail("a claim with this id comes earlier in the file")
        claims.append(claim)
    return tuple(claims)
