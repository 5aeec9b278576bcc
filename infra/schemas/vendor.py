"""Write the OpenAPI schema of CRDs as compact JSON, without their descriptions, for the manifest tests.

    python infra/schemas/vendor.py OUT_FOLDER CRD.yaml...

The tests (tests/test_k8s.py) validate infra/k8s against these schemas with unknown fields rejected,
as a strict API server does; the descriptions are left out because they are most of a CRD's size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def without_descriptions(node: Any) -> Any:
    """The schema with every `description` removed."""
    if isinstance(node, dict):
        return {k: without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def main(argv: list[str]) -> None:
    """Write OUT/<Kind>.<version>.json for the storage version of every CRD named."""
    out, files = Path(argv[0]), argv[1:]
    out.mkdir(parents=True, exist_ok=True)
    for file in files:
        crd = yaml.safe_load(Path(file).read_text())
        kind = crd["spec"]["names"]["kind"]
        for version in [v for v in crd["spec"]["versions"] if v.get("storage")]:
            schema = without_descriptions(version["schema"]["openAPIV3Schema"])
            path = out / f"{kind}.{version['name']}.json"
            path.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
            print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
