"""What editors and probes both stand on: models and their architecture adapters, deltas and the
keep policy, durable files, the machine (precision, threads), the scorer and model access, option
parsing, statistics, progress bars and the registered names.

Modules here import nothing of ``lifelong`` outside ``lifelong.core`` (and only ``streams`` beyond
it); the import contract in ``pyproject.toml`` (``[tool.importlinter]``, run by ``make lint``)
checks that, and that editors and probes above the core never import the engine above them.
"""
