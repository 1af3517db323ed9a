"""The shared workflows: UI files open with registered nodes, valid links and widget values; each
API twin is exactly its UI workflow converted; both run through the real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from comfy_client import is_widget, ui_to_api

pytestmark = pytest.mark.server
WORKFLOWS = Path(__file__).resolve().parent.parent / "example_workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
METHODS = {
    "loratorio",
    "loratorio-dynamic-pool",
    "loratorio-regions",
    "loratorio-style-merged",
    "loratorio-styles-found",
    "lora-switch",
    "lora-composite",
    "lora-merge-baseline",
}


@pytest.fixture(scope="module")
def object_info(server):
    return server.get_json("/object_info")


def test_every_method_has_a_ui_workflow_and_an_api_twin():
    assert {p.stem for p in UI_FILES} == METHODS
    assert {p.stem for p in (WORKFLOWS / "api").glob("*.json")} == METHODS


def test_every_workflow_has_a_template_picture():
    """The templates dialog shows ``<name>.jpg`` on the workflow's card."""
    from PIL import Image

    assert {p.stem for p in WORKFLOWS.glob("*.jpg")} == METHODS
    for path in WORKFLOWS.glob("*.jpg"):
        with Image.open(path) as picture:
            assert picture.format == "JPEG" and max(picture.size) == 256
            assert picture.convert("L").getextrema()[1] > 0  # not a blank card


def check_widget_value(node: dict, name: str, spec: list, value: object) -> None:
    where = f"{node['type']} (node {node['id']}) input {name}"
    kind, options = spec[0], spec[1] if len(spec) > 1 else {}
    if isinstance(kind, list):
        assert value in kind, f"{where}: {value!r} is not one of the choices"
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}: {value} out of range"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_is_valid_for_the_server(path, object_info):
    workflow = json.loads(path.read_text())
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in nodes.values():
        assert node["type"] in object_info, f"{node['type']} is not a registered node type"
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        source_node, target_node = nodes[source], nodes[target]
        assert link_id in source_node["outputs"][source_slot]["links"]
        assert target_node["inputs"][target_slot]["link"] == link_id
        assert object_info[source_node["type"]]["output"][source_slot] == kind == target_node["inputs"][target_slot]["type"]
    prompt = ui_to_api(workflow, object_info)
    for node_id, entry in prompt.items():
        info = object_info[entry["class_type"]]["input"]
        for section in ("required", "optional"):
            for name, spec in info.get(section, {}).items():
                value = entry["inputs"].get(name)
                if section == "required":
                    assert value is not None, f"{entry['class_type']} (node {node_id}) misses {name}"
                if value is not None and is_widget(spec) and not isinstance(value, list):
                    check_widget_value(nodes[int(node_id)], name, spec, value)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_twin_matches_its_ui_workflow(path, object_info):
    converted = ui_to_api(json.loads(path.read_text()), object_info)
    twin = json.loads((WORKFLOWS / "api" / path.name).read_text())
    assert converted == twin


@pytest.mark.parametrize("path", sorted((WORKFLOWS / "api").glob("*.json")), ids=lambda p: p.stem)
def test_single_pass_schedule_left_at_the_node_default_where_a_workflow_runs_every_step(path, object_info):
    """Switching such a workflow to single pass in the editor gives the tuned schedule, not a stale one."""
    for node in json.loads(path.read_text()).values():
        if node["inputs"].get("routing") != "every step":
            continue
        optional = object_info[node["class_type"]]["input"]["optional"]
        for name in ("full_steps", "refresh_every"):
            assert node["inputs"][name] == optional[name][1]["default"], f"{path.name}: {name}"
