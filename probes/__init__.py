"""What is measured: probes and suites, metrics (docs/METRICS.md).

``probes`` stands on ``lifelong.core`` (the scorer and model access, options, stats, progress bars)
and ``streams`` alone; it never imports the editors or the engine (the import contract in
pyproject.toml, checked by ``make lint``).
"""

from lifelong.core.options import OptionError, parse_options, split_spec
from probes.base import Probe, ProbeContext, ProbeSuite, Row, Schedule
from probes.chains import ChainProbe
from probes.downstream import DownstreamProbe
from probes.edit_quality import EditQualityProbe, RetentionProbe
from probes.perplexity import PerplexityProbe
from probes.weight_drift import WeightDriftProbe
from streams.errors import MissingFileError, UserError

# The probe registry: every probe is listed here, and only here.
PROBES: dict[str, type[Probe]] = {
    cls.name: cls
    for cls in (EditQualityProbe, RetentionProbe, ChainProbe, PerplexityProbe, WeightDriftProbe, DownstreamProbe)
}


class UnknownProbeError(UserError):
    pass


def make_probe(spec: str) -> Probe:
    """A probe from ``name`` or ``name:key=value,...``; the key ``schedule`` (every:K, log, end,
    chains) sets when it runs, every other key is one of the probe's ``Options``."""
    name, options = split_spec(spec)
    if name not in PROBES:
        raise UnknownProbeError(f"unknown probe '{name}': expected one of {', '.join(sorted(PROBES))}")
    cls = PROBES[name]
    schedule = options.pop("schedule", None)
    try:
        return cls(schedule, parse_options(cls.Options, options, name))
    except (OptionError, MissingFileError):  # a missing corpus or task file is named as it is
        raise
    except ValueError as err:  # a bad schedule
        raise OptionError(f"probe '{name}': {err}") from None


__all__ = [
    "PROBES",
    "ChainProbe",
    "EditQualityProbe",
    "UnknownProbeError",
    "make_probe",
    "Probe",
    "ProbeContext",
    "ProbeSuite",
    "RetentionProbe",
    "Row",
    "Schedule",
]
