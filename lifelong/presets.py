"""Paper presets: named evaluation protocols that set the stream batching, the probe schedule and the
scoring as a paper's evaluation code did (docs/METRICS.md, "Paper presets"), so that a number here
means what the paper's number means. ``lifelong replay --preset NAME[:KEY=VALUE,...]``.

A preset fills the settings it governs (``batch_size``, ``probe_every``, and the probes it adds). A
setting left at its default takes the preset's value; one given a different value is refused in one
line naming both, as is a ``--probe`` of a probe the preset sets: a run under a preset's name is
that preset's protocol. Probes the preset does not name (perplexity, weight drift, ...) may be added.

The preset's canonical spec (``wise-t:T=10``) is the run's ``preset`` setting: it is in the run's
identity and manifest, and on every result row (column ``preset``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lifelong.run import RunConfig
from streams.errors import UserError


@dataclass(frozen=True)
class Preset:
    """One paper's protocol: ``options`` are the whole-number options it takes, with their defaults
    (None: required); ``source`` names the evaluation code it follows (docs/METRICS.md gives file and line)."""

    name: str
    description: str
    source: str
    options: dict[str, int | None] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "immediate",
            "each edit scored right after its own step (edit_quality every step); retention once, at the end",
            "this project's default edit-quality protocol",
        ),
        Preset(
            "retention@k",
            "today's default: edit_quality every step, retention of every earlier edit every k steps "
            "(written retention@K, e.g. retention@5)",
            "this project's retention matrix (docs/METRICS.md §3)",
            {"k": 5},
        ),
        Preset(
            "counterfact-rome",
            "CounterFact as ROME/MEMIT score it: B edits per step (ROME: 1), probability ES/PS/NS of each "
            "edit right after its step, and n-gram-entropy fluency of greedy generations",
            "kmeng01/rome experiments/py/eval_utils_counterfact.py",
            {"B": 1},
        ),
        Preset(
            "zsre-toolkit",
            "ZsRE as EasyEdit and UltraEdit score it: B edits per step, every edit scored once on the final "
            "model by teacher-forced token accuracy (rewrite, rephrase, locality)",
            "zjunlp/EasyEdit easyeditor/evaluate/evaluate_utils.py test_prediction_acc; XiaojieGu/UltraEdit util.py",
            {"B": 1},
        ),
        Preset(
            "alphaedit-final",
            "AlphaEdit's sequential evaluation: batches of B edits (AlphaEdit: 100), then every edit scored "
            "once on the final model (ES/PS/NS) with the final model's fluency",
            "jianghoucheng/AlphaEdit experiments/evaluate.py",
            {"B": 100},
        ),
        Preset(
            "wise-t",
            "WISE's T protocol: the stream cut into floor(N/T) independent sequences of T edits (at most "
            "`sequences` of them), θ0 restored bitwise between sequences, each sequence's edits scored on its "
            "final model by token accuracy, figures averaged over sequences (n = sequences)",
            "zjunlp/EasyEdit examples/run_wise_editing.py, easyeditor/editors/editor.py",
            {"T": None, "sequences": None},
        ),
    )
}


@dataclass(frozen=True)
class PresetChoice:
    """A parsed preset spec: the preset and its options (defaults filled in)."""

    preset: Preset
    options: dict[str, int | None]

    @property
    def spec(self) -> str:
        """The one spelling of this choice, as runs record it."""
        if self.preset.name == "retention@k":
            return f"retention@{self.options['k']}"
        given = [f"{k}={v}" for k, v in self.options.items() if v is not None]
        return self.preset.name + (":" + ",".join(given) if given else "")

    @property
    def sequence_length(self) -> int | None:
        """T for a protocol of independent sequences (θ0 restored between them), else None."""
        return self.options.get("T") if self.preset.name == "wise-t" else None


def _whole(text: str, where: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{where} must be a whole number, got {text!r}") from None
    if value < 1:
        raise UserError(f"{where} must be at least 1, got {value}")
    return value


def parse_preset(spec: str) -> PresetChoice:
    """A :class:`PresetChoice` from ``NAME`` or ``NAME:KEY=VALUE,...`` (``retention@K``); a one-line
    error naming the preset, option or value that is wrong."""
    spec = spec.strip()
    if spec.startswith("retention@"):
        preset = PRESETS["retention@k"]
        return PresetChoice(preset, {"k": _whole(spec.partition("@")[2], f"--preset {spec}: k")})
    name, _, rest = spec.partition(":")
    if name not in PRESETS:
        known = ", ".join("retention@K" if n == "retention@k" else n for n in PRESETS)
        raise UserError(f"--preset: unknown preset '{name}': expected one of {known}")
    preset = PRESETS[name]
    options = dict(preset.options)
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in preset.options:
            takes = ", ".join(preset.options) or "no options"
            raise UserError(f"--preset {spec}: '{item}' is not an option of {name} (it takes {takes})")
        options[key] = _whole(value, f"--preset {spec}: {key}")
    missing = [k for k, v in options.items() if v is None and k == "T"]
    if missing:
        raise UserError(f"--preset {spec}: {name} needs {missing[0]}= (e.g. {name}:{missing[0]}=10)")
    return PresetChoice(preset, options)


def _probe_specs(choice: PresetChoice) -> list[str]:
    """The probes a preset sets, as ``--probe`` specs."""
    name = choice.preset.name
    if name == "immediate":
        return ["retention:schedule=end"]
    if name == "retention@k":  # as the default suite's, named so that another retention probe is refused
        return [f"retention:schedule=every:{choice.options['k']}"]
    if name == "counterfact-rome":
        return ["fluency", "retention:schedule=end"]
    if name == "zsre-toolkit":
        return ["final_quality:token_acc=true", "retention:schedule=end"]
    if name == "alphaedit-final":
        return ["final_quality", "fluency:schedule=end,edits=all", "retention:schedule=end"]
    if name == "wise-t":
        return ["final_quality:token_acc=true", "retention:schedule=end"]
    raise AssertionError(name)


def _settings(choice: PresetChoice) -> dict[str, int | None]:
    """The flag settings a preset fixes (names of :class:`RunConfig` fields)."""
    name = choice.preset.name
    if name == "retention@k":
        return {"probe_every": choice.options["k"]}
    if "B" in choice.options:
        return {"batch_size": choice.options["B"]}
    if name == "wise-t":
        return {"batch_size": 1}  # WISE edits one request at a time (run_wise_editing.py)
    return {}


def apply_preset(config: RunConfig) -> tuple[RunConfig, PresetChoice | None]:
    """``config`` with its preset's settings and probes filled in (and its ``preset`` in canonical
    spelling), and the parsed preset; ``config`` unchanged when it names none. A setting given a value
    other than its default and the preset's, or a probe the preset sets, is refused in one line."""
    if config.preset is None:
        return config, None
    choice = parse_preset(config.preset)
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    changes: dict = {"preset": choice.spec}
    for key, value in _settings(choice).items():
        given = getattr(config, key)
        if given not in (defaults[key], value):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {given} conflicts with --preset {choice.spec}, which sets it to {value}")
        changes[key] = value
    specs = _probe_specs(choice)
    from probes import make_probe

    wanted = {s.partition(":")[0]: make_probe(s).config() for s in specs}
    have = set()
    for spec in config.probes:
        name = spec.partition(":")[0]
        # The preset's own probe, however spelled (a config it was applied to before, a manifest's
        # probes): kept as it is. Any other setting of a probe the preset sets is a conflict.
        if name in wanted and make_probe(spec).config() != wanted[name]:
            raise UserError(f"--probe {spec} conflicts with --preset {choice.spec}, which sets probe '{name}'")
        have.add(name)
    changes["probes"] = [*config.probes, *(s for s in specs if s.partition(":")[0] not in have)]
    return dataclasses.replace(config, **changes), choice


def sequence_figures(choice: PresetChoice, results: list, names: list[str]) -> dict:
    """The figures of a protocol of independent sequences (``wise-t``): per sequence, the mean over its
    edits of each (metric, protocol) of the final-quality rows at its last step; then their mean over
    sequences with n = sequences (the independent unit) and a 95% t interval cut to [0, 1] (none for
    one sequence). ``results``: each sequence run's results table."""
    import polars as pl

    from lifelong.core.stats import over_seeds

    per_sequence: dict[tuple[str, str], list[float]] = {}
    for table in results:
        rows = table.filter((pl.col("probe") == "final_quality") & pl.col("edit_id").is_not_null())
        rows = rows.filter(pl.col("step") == rows["step"].max())
        for (metric, protocol), group in rows.group_by(["metric", "protocol"], maintain_order=True):
            per_sequence.setdefault((str(metric), str(protocol)), []).append(float(group["value"].mean()))
    figures = []
    for (metric, protocol), values in sorted(per_sequence.items()):
        e = over_seeds(values, bounds=(0.0, 1.0))
        figures.append(
            {
                "probe": "final_quality",
                "metric": metric,
                "protocol": protocol,
                "mean": e.value,
                "n": e.n,
                "low": e.low,
                "high": e.high,
                "interval": e.method or "none (one sequence)",
                "per_sequence": values,
            }
        )
    return {
        "preset": choice.spec,
        "T": choice.sequence_length,
        "sequences": len(results),
        "runs": names,
        "figures": figures,
    }


def format_sequence_figures(summary: dict) -> str:
    """``preset.json``'s figures, one line each: mean [95% interval] over n sequences."""
    lines = [
        f"preset {summary['preset']}: {summary['sequences']} independent sequences of {summary['T']} edits "
        f"(θ0 restored between them; edits of the stream left out: {summary.get('edits_left_out', 0)})"
    ]
    for f in summary["figures"]:
        interval = f"[{f['low']:.3f}, {f['high']:.3f}]" if f["low"] is not None else "(no interval: one sequence)"
        if f["low"] is not None and f["low"] == f["high"]:
            interval += " (every sequence gave this value: a t interval has no width then)"
        lines.append(f"  {f['metric']:<15} {f['protocol']:<15} {f['mean']:.3f} {interval}  n={f['n']} sequences")
    return "\n".join(lines)
