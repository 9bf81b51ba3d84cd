"""Write lifelong/core/editor_settings.json: each built-in editor's setting names, from its Params.

    python tools/write_editor_settings.py

Run it after adding or renaming an editor setting (tests/test_cli.py says when it is stale): the command
line reads the file to refuse a mistyped ``--set`` before it imports torch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lifelong.core.names import EDITOR_CLASSES, EDITOR_SETTINGS_FILE
from lifelong.editors import editor_class


def editor_settings() -> dict[str, list[str]]:
    return {name: [f.name for f in dataclasses.fields(editor_class(name).Params)] for name in sorted(EDITOR_CLASSES)}


def main() -> None:
    path = Path(__file__).resolve().parents[1] / "lifelong" / "core" / EDITOR_SETTINGS_FILE
    path.write_text(json.dumps(editor_settings(), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
