"""Check the pack's node ids against ComfyUI-Manager's node map (its ``extension-node-map.json``).

    python3 tools/host.py run -- tools/check_node_ids.py /path/to/extension-node-map.json [--write-snapshot]

"Install missing nodes" resolves a workflow's node ids through that map, so an id another pack
also uses (ignoring case) is ambiguous. Every id of the pack starts with ``LoRAtorio``; the map's
ids with that prefix (from other packs) are what could collide, and ``--write-snapshot`` keeps
them in ``tests/data/node-map-prefix.json`` for the suite to check against.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PREFIX = "loratorio"
SNAPSHOT = Path(__file__).resolve().parent.parent / "tests" / "data" / "node-map-prefix.json"


def prefixed_ids(node_map: dict) -> dict[str, list[str]]:
    """Other packs' node ids that start with the pack's prefix (ignoring case), by pack URL."""
    found: dict[str, list[str]] = {}
    for url, entry in node_map.items():
        ids = entry[0] if isinstance(entry, list) and entry and isinstance(entry[0], list) else []
        matching = sorted(i for i in ids if isinstance(i, str) and i.lower().startswith(PREFIX))
        if matching and "loratorio" not in url.lower():
            found[url] = matching
    return found


def collisions(ours: list[str], others: dict[str, list[str]]) -> list[tuple[str, str]]:
    taken = {i.lower(): url for url, ids in others.items() for i in ids}
    return [(node_id, taken[node_id.lower()]) for node_id in ours if node_id.lower() in taken]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("node_map", type=Path, help="ComfyUI-Manager's extension-node-map.json")
    parser.add_argument("--write-snapshot", action="store_true", help=f"write the prefixed ids to {SNAPSHOT.name}")
    options = parser.parse_args(argv)
    try:
        node_map = json.loads(options.node_map.read_text())
    except (OSError, ValueError) as error:
        parser.error(f"cannot read {options.node_map} as JSON ({error}); pass ComfyUI-Manager's extension-node-map.json")
    others = prefixed_ids(node_map)
    print(f"{len(node_map)} packs in the map; ids starting with '{PREFIX}' in other packs: {others or 'none'}")
    if options.write_snapshot:
        SNAPSHOT.write_text(json.dumps({"packs_in_map": len(node_map), "prefixed_ids": others}, indent=2) + "\n")
        print(f"wrote {SNAPSHOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
