"""The collector's OpenAPI description as committed in docs/openapi.json.

Invariant: the text is a pure function of the code (FastAPI's description of the app,
JSON with two-space indentation and a final newline), so ``scripts/openapi`` regenerates it
byte for byte and a test fails when the committed file is stale.
"""

from __future__ import annotations

import json
import sys
from typing import Any, cast

from sshaudit.collector.app import create_app
from sshaudit.collector.deps import Context
from sshaudit.collector.storage import Storage


def openapi_document() -> dict[str, Any]:
    # Describing the routes never touches the storage: none is opened.
    app = create_app(Context(storage=cast(Storage, object())))
    return app.openapi()


def render() -> str:
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
