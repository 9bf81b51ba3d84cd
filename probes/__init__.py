"""What is measured: the batched scorer, probes and suites, metrics (METRICS.md).

``probes`` may import ``streams`` (the Edit type) but never ``lifelong``.
"""

from probes.base import Probe, ProbeContext, ProbeSuite, Row, Schedule
from probes.edit_quality import EditQualityProbe, RetentionProbe
from probes.scorer import Scorer, Scores

# The probe registry: every probe is listed here, and only here.
PROBES: dict[str, type[Probe]] = {cls.name: cls for cls in (EditQualityProbe, RetentionProbe)}

__all__ = [
    "PROBES", "EditQualityProbe", "Probe", "ProbeContext", "ProbeSuite", "RetentionProbe", "Row",
    "Schedule", "Scorer", "Scores",
]
