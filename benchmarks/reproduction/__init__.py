"""benchmarks/reproduce.py's parts: the claims read from benchmarks/claims.toml (claims), the measures and
verdict rules their figures use (measures), the runs of their arms (runner) and the document (report)."""
