"""What is measured: probes and suites, metrics (docs/METRICS.md).

``probes`` stands on ``lifelong.core`` (the scorer and model access, options, stats, progress bars)
and ``streams`` alone; it never imports the editors or the engine (the import contract in
pyproject.toml, checked by ``make lint``).
"""

from lifelong.core.names import (
    PROBE_CLASSES,
    installed_probes,
    is_class_path,
    load_class,
    probe_name,
    unknown_probe,
)
from lifelong.core.options import OptionError, parse_options, split_spec
from probes.base import Probe, ProbeContext, ProbeSuite, Row, Schedule
from probes.chains import ChainProbe
from probes.downstream import DownstreamProbe
from probes.edit_quality import EditQualityProbe, RetentionProbe
from probes.perplexity import PerplexityProbe
from probes.weight_drift import WeightDriftProbe
from streams.errors import MissingFileError, UserError


class UnknownProbeError(UserError):
    pass


def _load(path: str) -> type[Probe]:
    return load_class(path, Probe, UnknownProbeError, "probe", "probes.Probe")


PROBES: dict[str, type[Probe]] = {name: _load(path) for name, path in PROBE_CLASSES.items()}
"""Every built-in probe by name (from :data:`lifelong.core.names.PROBE_CLASSES`); probes of installed
packages (entry-point group ``lifelong.probes``) and ``module.path:Class`` join on use (:func:`probe_class`)."""


def probe_class(name: str) -> type[Probe]:
    """The probe class of a built-in or installed name, or of a ``module.path:Class``."""
    if name in PROBES:
        return PROBES[name]
    installed = installed_probes()
    if name in installed:
        return _load(installed[name])
    if is_class_path(name):
        return _load(name)
    raise UnknownProbeError(unknown_probe(name) or f"unknown probe '{name}'")


def make_probe(spec: str) -> Probe:
    """A probe from ``name`` or ``name:key=value,...`` (``name``: built-in, installed, or
    ``module.path:Class``); the key ``schedule`` (every:K, log, end, chains) sets when it runs, every
    other key is one of the probe's ``Options``."""
    name, rest = probe_name(spec)
    options = split_spec(f"probe:{rest}")[1]
    cls = probe_class(name)
    schedule = options.pop("schedule", None)
    try:
        probe = cls(schedule, parse_options(cls.Options, options, name))
        if name not in PROBES:
            probe.source = name  # recorded, so a resume or a manifest rebuilds it by the same name
        return probe
    except (OptionError, MissingFileError):  # a missing corpus or task file is named as it is
        raise
    except ValueError as err:  # a bad schedule
        raise OptionError(f"probe '{name}': {err}") from None


__all__ = [
    "PROBES",
    "ChainProbe",
    "DownstreamProbe",
    "PerplexityProbe",
    "WeightDriftProbe",
    "EditQualityProbe",
    "UnknownProbeError",
    "make_probe",
    "probe_class",
    "Probe",
    "ProbeContext",
    "ProbeSuite",
    "RetentionProbe",
    "Row",
    "Schedule",
]
