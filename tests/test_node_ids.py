"""Node ids: prefixed, and free in ComfyUI-Manager's node map (which "install missing nodes" resolves through)."""

from __future__ import annotations

import json
from pathlib import Path

from check_node_ids import collisions, prefixed_ids

SNAPSHOT = Path(__file__).resolve().parent / "data" / "node-map-prefix.json"


def test_every_node_id_is_prefixed_and_no_other_pack_uses_it(pack):
    from comfyui_loratorio.nodes import LEGACY_NODE_IDS

    legacy = set(LEGACY_NODE_IDS)
    ours = [node_id for node_id in pack.NODE_CLASS_MAPPINGS if node_id not in legacy]
    assert {"LoRAtorioStepWindow", "LoRAtorioStrengthBudget", "LoRAtorioMultiLoRALoader"} <= set(ours)
    assert all(node_id.startswith("LoRAtorio") for node_id in ours)
    snapshot = json.loads(SNAPSHOT.read_text())
    assert snapshot["packs_in_map"] > 1000, "the snapshot was taken from the real map"
    assert collisions(ours, snapshot["prefixed_ids"]) == []


def test_the_check_finds_an_id_taken_in_another_case():
    node_map = {
        "https://github.com/someone/pack": [["LoraMerge", "loratoriosampler"], {"title_aux": "pack"}],
        "https://github.com/someone/comfyui-loratorio-fork": [["LoRAtorioSampler"], {}],
    }
    others = prefixed_ids(node_map)
    assert others == {"https://github.com/someone/pack": ["loratoriosampler"]}, "forks of this pack are not other packs"
    assert collisions(["LoRAtorioSampler", "LoRAtorioMerge"], others) == [("LoRAtorioSampler", "https://github.com/someone/pack")]
