"""What is measured: probes and suites, metrics (docs/METRICS.md).

``probes`` may import ``streams`` (the Edit type) and, of ``lifelong``, only the modules it shares
with the editors, which import nothing else of ``lifelong``: the model interface
(``lifelong.scorer``, ``lifelong.model_access``), option parsing (``lifelong.options``) and progress
bars (``lifelong.bars``). ``tests/test_scorer.py`` checks both halves.
"""

from lifelong.options import OptionError, parse_options, split_spec
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
