"""The real ComfyUI server loads the pack and lists its nodes; it never outlives the test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.server import comfyui_server

pytestmark = pytest.mark.server


def test_server_lists_the_pack_nodes_and_stops(comfyui_dir, tmp_path, pack):
    with comfyui_server(comfyui_dir, tmp_path) as server:
        object_info = server.get_json("/object_info")
        for name, cls in pack.NODE_CLASS_MAPPINGS.items():
            assert name in object_info, f"{name} missing from /object_info"
            assert object_info[name]["category"] == cls.CATEGORY
            assert object_info[name]["display_name"] == pack.NODE_DISPLAY_NAME_MAPPINGS[name]
        assert "LoraLoader" in object_info  # the host's own nodes are there too
        extensions = server.get_json("/extensions")
        assert isinstance(extensions, list)
        log = server.log()
        assert "IMPORT FAILED" not in log
        assert "failed to load" not in log, "a node module of the pack failed to import in the server"
        # this checkout's pack, through the link in the server's own folder, whatever the host links
        own_link = tmp_path / "custom_nodes" / "comfyui-loratorio"
        assert f"seconds: {own_link}" in log
        assert own_link.resolve() == Path(__file__).resolve().parents[1]
        pid = server.process.pid
    assert server.process.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_server_is_stopped_when_the_test_body_fails(comfyui_dir, tmp_path):
    with pytest.raises(RuntimeError, match="deliberate"), comfyui_server(comfyui_dir, tmp_path) as server:
        raise RuntimeError("deliberate failure inside the server's lifetime")
    assert server.process.poll() is not None
