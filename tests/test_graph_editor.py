"""The pack in ComfyUI's real graph editor, driven in headless Chromium against the real server.

Screenshots of each state go to ``test-artifacts/graph-editor/``.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest

from support.server import execution_error

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts" / "graph-editor"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
CHARACTER = "demo-character-kohya.safetensors"
STYLE = "demo-style-peft.safetensors"


@pytest.fixture(scope="module")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make test installs it)")
    from browser import CHROMIUM_ARGS, chromium_path

    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium on this machine and tools/browser.py could not install Debian's chromium (needs apt + root)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
        yield browser
        browser.close()


@contextlib.contextmanager
def open_editor(chromium, url: str, vue_nodes: bool = False):
    """A fresh page of the graph editor at ``url``; on the way out, no error from the pack's script."""
    from support.graph_editor import GraphEditor

    page = chromium.new_page(viewport={"width": 1400, "height": 900})
    editor = GraphEditor(page, url, ARTIFACTS, vue_nodes=vue_nodes)
    try:
        editor.open()
        yield editor
    finally:
        page.close()
    assert editor.pack_errors() == []


@pytest.fixture
def editor(chromium, server):
    with open_editor(chromium, server.url) as editor:
        yield editor


@pytest.fixture
def nodes_2_editor(chromium, server):
    """The editor with Nodes 2.0 on, where the frontend has it (the default of new installs since 2026)."""
    with open_editor(chromium, server.url, vue_nodes=True) as editor:
        if not editor.vue_nodes_active():
            pytest.skip("this frontend has no Nodes 2.0 (Comfy.VueNodes.Enabled)")
        if not editor.vue_widgets_addressable():
            pytest.skip("this frontend's early Nodes 2.0 names no widget in the DOM (data-widget-name, frontend 1.4x on)")
        editor.clear()
        yield editor


def expected_widgets(node_info: dict) -> set[str]:
    """Inputs the editor shows as widgets: combos and the scalar types."""
    inputs = {**node_info["input"].get("required", {}), **node_info["input"].get("optional", {})}
    return {name for name, spec in inputs.items() if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES}


def test_node_search_finds_every_pack_node_and_adds_it_with_its_widgets(editor, server, pack):
    object_info = server.get_json("/object_info")
    for node_type, display_name in pack.NODE_DISPLAY_NAME_MAPPINGS.items():
        if getattr(pack.NODE_CLASS_MAPPINGS[node_type], "DEPRECATED", False):
            continue  # the old ids: hidden from the search, kept for saved workflows
        editor.clear()
        first_result = editor.search_and_add(display_name)
        assert first_result[0] == display_name and "comfyui-loratorio" in first_result, first_result
        node_id = editor.node_id(node_type)
        widgets = editor.widgets(node_id)
        missing = expected_widgets(object_info[node_type]) - set(widgets)
        assert not missing, f"{node_type} is missing widgets {missing}"
        if node_type == "LoRAtorioMultiLoRALoader":
            shown = editor.widgets(node_id, shown_only=True)
            assert list(shown) == ["lora_1", "strength_1", "enabled_1", "+ Add LoRA", "- Remove last LoRA"]
        if node_type in ("LoRAtorioMultiLoRALoader", "LoRAtorioSampler"):
            editor.screenshot(f"search-added-{node_type}")


def template_names() -> list[str]:
    return sorted(path.stem for path in (REPO / "example_workflows").glob("*.json"))


def test_missing_nodes_are_detected(editor):
    """The check the template test relies on does see a node type the server lacks."""
    workflow = json.loads((REPO / "example_workflows" / "loratorio.json").read_text())
    workflow["nodes"][0]["type"] = "NoSuchLoRANode"
    editor.page.evaluate("async workflow => await app.loadGraphData(workflow)", workflow)
    editor.page.wait_for_timeout(500)
    assert "NoSuchLoRANode" in editor.missing_node_types() or any("NoSuchLoRANode" in t for t in editor.dialog_texts())


def test_a_workflow_saved_with_the_old_node_ids_opens_without_missing_nodes(editor):
    legacy = json.loads((REPO / "tests" / "data" / "legacy-loratorio.json").read_text())
    assert "MultiLoRALoader" in {node["type"] for node in legacy["nodes"]}
    editor.page.evaluate("async workflow => await app.loadGraphData(workflow)", legacy)
    editor.page.wait_for_timeout(500)
    assert editor.missing_node_types() == []
    loader = editor.node_id("MultiLoRALoader")
    shown = editor.widgets(loader, shown_only=True)
    assert "+ Add LoRA" in shown and "lora_3" in shown and "lora_4" not in shown, "the row extension runs on the old id too"


@pytest.mark.parametrize("name", template_names())
def test_each_workflow_opens_from_the_templates_dialog_without_missing_nodes(editor, name):
    editor.open_template(name)
    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    assert sorted(node["type"] for node in editor.nodes()) == sorted(node["type"] for node in workflow["nodes"])
    assert editor.missing_node_types() == []
    assert not [text for text in editor.dialog_texts() if "missing" in text.lower()]
    editor.screenshot(f"template-{name}")


def finished_entry(server, prompt_id: str, timeout: float = 300) -> dict:
    """The history entry of a queued prompt once the server has run it (KeyError if it never does)."""
    deadline = time.monotonic() + timeout
    while prompt_id not in (history := server.get_json(f"/history/{prompt_id}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    return history[prompt_id]


def run_small_loratorio_template(editor) -> tuple[int, str]:
    """Open the LoRAtorio template, shrink it to 2 steps at 64x64, click Run: (sampler node id, prompt id)."""
    editor.open_template("loratorio")
    sampler = editor.node_id("LoRAtorioSampler")
    latent = editor.node_id("EmptyLatentImage")
    editor.set_widget(sampler, "steps", 2)
    editor.set_widget(latent, "width", 64)
    editor.set_widget(latent, "height", 64)
    return sampler, editor.run()


def scalar(value: object) -> bool:
    return isinstance(value, (str, int, float, bool))


def test_adding_and_removing_lora_rows_changes_the_queued_payload(editor):
    editor.page.evaluate(
        "() => { const n = LiteGraph.createNode('LoRAtorioMultiLoRALoader'); n.pos = [320, 160]; app.graph.add(n); }"
    )
    loader = editor.node_id("LoRAtorioMultiLoRALoader")
    rows = lambda: editor.api_payload()[str(loader)]["inputs"]  # noqa: E731
    assert rows() == {"lora_1": "None", "strength_1": 1.0, "enabled_1": True}
    # frontend 1.48.7 (ComfyUI v0.33.0) drops a click on a node added a moment ago now and then
    editor.page.wait_for_timeout(500)

    editor.click_widget(loader, "+ Add LoRA")
    assert rows() == {
        "lora_1": "None",
        "strength_1": 1.0,
        "enabled_1": True,
        "lora_2": "None",
        "strength_2": 1.0,
        "enabled_2": True,
    }

    editor.set_widget(loader, "lora_1", CHARACTER)
    editor.set_widget(loader, "lora_2", STYLE)
    editor.set_widget(loader, "strength_2", 0.6)
    editor.click_widget(loader, "enabled_2")  # the toggle, clicked
    payload = rows()
    assert payload == {
        "lora_1": CHARACTER,
        "strength_1": 1.0,
        "enabled_1": True,
        "lora_2": STYLE,
        "strength_2": 0.6,
        "enabled_2": False,
    }
    assert all(scalar(value) for value in payload.values())

    editor.page.wait_for_function(f"() => app.graph.getNodeById({loader}).widgets.find(w => w.name === 'trigger_words').value")
    assert editor.widgets(loader)["trigger_words"] == "1: knight, red shield, armour\n2: watercolour, soft wash"
    editor.screenshot("multi-lora-loader-two-rows")

    editor.context_menu(loader, f"Remove LoRA row 1 ({CHARACTER})")
    assert rows() == {"lora_1": STYLE, "strength_1": 0.6, "enabled_1": False}
    assert editor.widgets(loader, shown_only=True).get("trigger_words") == "1: watercolour, soft wash"

    saved = editor.page.evaluate("() => app.graph.serialize()")
    editor.clear()
    editor.page.evaluate("async workflow => await app.loadGraphData(workflow)", saved)
    assert rows() == {"lora_1": STYLE, "strength_1": 0.6, "enabled_1": False}

    for _ in range(8):
        editor.click_widget(loader, "+ Add LoRA")
    assert len(rows()) == 3 * 8  # the eighth row is the last; Add is disabled there
    assert editor.page.evaluate(f"() => app.graph.getNodeById({loader}).widgets.find(w => w.name === '+ Add LoRA').disabled")


def test_queueing_the_loratorio_workflow_gives_an_image_and_the_weight_map_on_the_node(editor, server):
    sampler, prompt_id = run_small_loratorio_template(editor)

    loader_inputs = editor.queued_prompt[str(editor.node_id("LoRAtorioMultiLoRALoader"))]["inputs"]
    assert sorted(loader_inputs) == sorted(f"{field}_{row}" for field in ("lora", "strength", "enabled") for row in (1, 2, 3))
    assert all(scalar(value) for value in loader_inputs.values())

    entry = finished_entry(server, prompt_id)
    assert execution_error(entry) is None
    saved = [image for output in entry["outputs"].values() for image in output.get("images", []) if image["type"] == "output"]
    output_dir = server.log_path.parent / "output"
    assert saved and all((output_dir / image["subfolder"] / image["filename"]).is_file() for image in saved)

    editor.page.wait_for_function(f"() => (app.graph.getNodeById({sampler}).imgs ?? []).length > 0", timeout=30_000)
    shown = editor.page.evaluate(f"() => app.graph.getNodeById({sampler}).imgs.map(img => img.src)")
    assert len(shown) == 1 and "loratorio-weightmaps" in shown[0] and "type=temp" in shown[0]
    editor.page.wait_for_timeout(500)
    editor.screenshot("loratorio-workflow-after-run")


def test_nodes_2_rows_grow_and_shrink_the_payload_stays_scalar_and_the_weight_map_shows(nodes_2_editor, server):
    editor = nodes_2_editor
    editor.page.evaluate(
        "() => { const n = LiteGraph.createNode('LoRAtorioMultiLoRALoader'); n.pos = [320, 160]; app.graph.add(n); }"
    )
    loader = editor.node_id("LoRAtorioMultiLoRALoader")
    rows = lambda: editor.api_payload()[str(loader)]["inputs"]  # noqa: E731
    editor.widget_element(loader, "lora_1").wait_for()
    assert rows() == {"lora_1": "None", "strength_1": 1.0, "enabled_1": True}
    assert not editor.widget_element(loader, "lora_2").is_visible()

    editor.click_widget(loader, "+ Add LoRA")
    editor.widget_element(loader, "lora_2").wait_for()
    editor.set_widget(loader, "lora_1", CHARACTER)
    editor.set_widget(loader, "lora_2", STYLE)
    editor.click_widget(loader, "enabled_2")
    payload = rows()
    assert payload == {
        "lora_1": CHARACTER,
        "strength_1": 1.0,
        "enabled_1": True,
        "lora_2": STYLE,
        "strength_2": 1.0,
        "enabled_2": False,
    }
    assert all(scalar(value) for value in payload.values())
    editor.screenshot("nodes-2-multi-lora-loader-two-rows")

    editor.click_widget(loader, "- Remove last LoRA")
    assert rows() == {"lora_1": CHARACTER, "strength_1": 1.0, "enabled_1": True}
    editor.widget_element(loader, "lora_2").wait_for(state="hidden")

    sampler, prompt_id = run_small_loratorio_template(editor)
    assert execution_error(finished_entry(server, prompt_id)) is None
    weight_map = editor.page.locator(f'[data-node-id="{sampler}"] img[src*="loratorio-weightmaps"]').first
    weight_map.wait_for(timeout=30_000)
    editor.screenshot("nodes-2-loratorio-workflow-after-run")


@pytest.fixture
def toy_editor(chromium, toy_server):
    with open_editor(chromium, toy_server.url) as editor:
        yield editor


def test_run_on_the_toy_loratorio_template_draws_the_asked_concepts(toy_editor, toy_server):
    """What a newcomer does after ``make serve``: open the toy LoRAtorio template, click Run."""
    import numpy as np
    from PIL import Image
    from quality.detector import detect

    editor = toy_editor
    editor.open_template("toy-loratorio", section="loratorio_toy_world")
    sampler = editor.node_id("LoRAtorioSampler")
    prompt_id = editor.run()
    entry = finished_entry(toy_server, prompt_id)
    assert execution_error(entry) is None
    saved = [image for output in entry["outputs"].values() for image in output.get("images", []) if image["type"] == "output"]
    output_dir = toy_server.log_path.parent / "output"
    (picture,) = [output_dir / i["subfolder"] / i["filename"] for i in saved if "weightmaps" not in i["filename"]]
    pixels = np.asarray(Image.open(picture).convert("RGB"), dtype=np.float32)
    found = detect(pixels[:: pixels.shape[0] // 32, :: pixels.shape[1] // 32] / 255.0)  # back to the 32x32 toy image
    asked = {"ruby-disk", "lemon-stripe", "dusk-style"}
    assert len(asked & found.colour_present) >= 2 and asked & found.present, (found, picture)
    editor.page.wait_for_function(f"() => (app.graph.getNodeById({sampler}).imgs ?? []).length > 0", timeout=30_000)
    editor.screenshot("toy-loratorio-after-run")
