"""Trigger words from LoRA metadata: the reader, the rules, and the server route the graph editor calls."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch


@pytest.fixture(scope="module")
def lm(pack):
    """The pack's ``lora_metadata`` module (the pack is imported the way ComfyUI imports it)."""
    from comfyui_loratorio.loratorio_comfy import lora_metadata

    return lora_metadata


def write(path, metadata: dict[str, str] | None) -> None:
    safetensors.torch.save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(path), metadata=metadata)


def test_spec_trigger_phrase_wins_over_tag_statistics(lm, tmp_path):
    path = tmp_path / "a.safetensors"
    tags = json.dumps({"10_knight": {"knight": 40, "red shield": 12}})
    write(path, {"modelspec.trigger_phrase": "sks knight, red shield ,sks knight", "ss_tag_frequency": tags})
    assert lm.trigger_words(lm.read_metadata(path)) == (["sks knight", "red shield"], "modelspec.trigger_phrase")


def test_json_list_of_trigger_words(lm):
    assert lm.trigger_words({"trigger_words": '["moth wings", "glow"]'}) == (["moth wings", "glow"], "trigger_words")


def test_kohya_tag_frequency_gives_the_most_frequent_tags_over_all_datasets(lm):
    tags = {"5_a": {"knight": 3, "armour": 9, "sky": 1}, "5_b": {"knight": 8, "tree": 2, "grass": 2, "cloud": 2}}
    words, source = lm.trigger_words({"ss_tag_frequency": json.dumps(tags)})
    assert source == "ss_tag_frequency"
    assert words == ["knight", "armour", "cloud", "grass", "tree"]  # 11, 9, then ties by text; "sky" is sixth


@pytest.mark.parametrize(
    "metadata",
    [None, {"ss_tag_frequency": "not json"}, {"ss_tag_frequency": json.dumps(["list"])}, {"modelspec.trigger_phrase": " , "}],
)
def test_files_without_usable_trigger_words_give_none(lm, tmp_path, metadata):
    path = tmp_path / "plain.safetensors"
    write(path, metadata)
    assert lm.trigger_words(lm.read_metadata(path)) == ([], None)


def test_damaged_or_foreign_files_are_named_errors(lm, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(b"\x01\x02")
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 8) + b"{not json")
    pickled = tmp_path / "old.ckpt"
    pickled.write_bytes(b"\x80\x04")
    for path, message in [
        (truncated, "too short"),
        (huge, "implausible header"),
        (garbage, "damaged"),
        (pickled, "not a .safetensors"),
    ]:
        with pytest.raises(lm.MetadataError, match=message):
            lm.read_metadata(path)


def lora_info(server, query: str) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{server.url}/loratorio/lora_info{query}", timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_the_route_the_graph_editor_calls(server):
    assert lora_info(server, "?name=demo-character-kohya.safetensors") == (
        200,
        {
            "name": "demo-character-kohya.safetensors",
            "trigger_words": ["knight", "red shield", "armour"],
            "source": "ss_tag_frequency",
            "error": None,
        },
    )
    assert lora_info(server, "?name=demo-background-comfy.safetensors")[1]["trigger_words"] == []
    status, body = lora_info(server, "?name=corrupt.safetensors")
    assert status == 422 and "damaged" in body["error"]
    status, body = lora_info(server, "?name=missing.safetensors")
    assert status == 404 and "not in any loras folder" in body["error"]
    status, body = lora_info(server, "")
    assert status == 400 and "?name=" in body["error"]
