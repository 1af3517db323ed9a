"""Drive ComfyUI's real graph editor (its shipped frontend) in headless Chromium with Playwright.

Everything a test does goes through what a person uses: the node search box, the templates
dialog, mouse clicks on widgets and context menus, the Run button. ``page.evaluate`` is used to
read the graph's state back and to pick combo values (the combo menu is a canvas popup).
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from playwright.sync_api import Page
from playwright.sync_api import TimeoutError as PlaywrightTimeout

PACK_NAME = "comfyui-loratorio"
# A new user gets the getting-started templates browser on first load; a person closes it, we skip it.
FRESH_USER_SETTINGS = {"Comfy.TutorialCompleted": True}
VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"
# The frontend's "Introducing Nodes 2.0" banner covers the top of the page: close it as a person would.
CLOSE_NEWS_BANNER = """() => {
  const message = [...document.querySelectorAll('span')].find(s => s.textContent.startsWith('Introducing Nodes 2.0'));
  const buttons = message?.parentElement?.parentElement?.querySelectorAll('button') ?? [];
  buttons[buttons.length - 1]?.click();
}"""
NODE_SEARCH_INPUT = "input[placeholder='Search Nodes...'], input[role=combobox][aria-controls=results-list]"
NODE_SEARCH_RESULT = "li.p-autocomplete-option, #results-list [role=option]"
APP_READY = "() => Boolean(window.app && window.app.graph && window.app.canvas && window.LiteGraph)"


class GraphEditor:
    """``vue_nodes``: the editor with Nodes 2.0 (``Comfy.VueNodes.Enabled``), where nodes and their
    widgets are DOM elements (``[data-node-id] [data-widget-name]``) instead of canvas drawings."""

    def __init__(self, page: Page, url: str, artifacts: Path, vue_nodes: bool = False):
        self.page = page
        self.url = url
        self.artifacts = artifacts
        self.vue_nodes = vue_nodes
        self.console_errors: list[str] = []
        page.on("console", lambda message: message.type == "error" and self.console_errors.append(message.text))
        page.on("pageerror", lambda error: self.console_errors.append(str(error)))

    def open(self) -> None:
        for setting, value in {**FRESH_USER_SETTINGS, VUE_NODES_SETTING: self.vue_nodes}.items():
            request = urllib.request.Request(f"{self.url}/api/settings/{setting}", data=json.dumps(value).encode(), method="POST")
            urllib.request.urlopen(request, timeout=30).close()
        self.page.goto(self.url + "/")
        self.page.wait_for_function(APP_READY, timeout=90_000)
        self.page.wait_for_function("() => LiteGraph.registered_node_types['LoRAtorioMultiLoRALoader'] !== undefined")
        self.page.evaluate(CLOSE_NEWS_BANNER)
        self.clear()

    def clear(self) -> None:
        self.page.evaluate(
            "() => { app.graph.clear(); app.canvas.ds.offset[0] = 0; app.canvas.ds.offset[1] = 0; app.canvas.ds.scale = 1; }"
        )

    def screenshot(self, name: str) -> Path:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def pack_errors(self) -> list[str]:
        """Console errors that mention this pack's extension or routes."""
        return [text for text in self.console_errors if "loratorio" in text.lower()]

    # --- reading the graph -------------------------------------------------------------------

    def nodes(self) -> list[dict]:
        return self.page.evaluate("() => app.graph.nodes.map(n => ({id: n.id, type: n.type, title: n.title}))")

    def node_id(self, node_type: str) -> int:
        ids = [node["id"] for node in self.nodes() if node["type"] == node_type]
        assert len(ids) == 1, f"expected one {node_type} on the canvas, found {len(ids)}"
        return ids[0]

    def widgets(self, node_id: int, shown_only: bool = False) -> dict[str, object]:
        return self.page.evaluate(
            """([id, shownOnly]) => Object.fromEntries((app.graph.getNodeById(id).widgets ?? [])
                 .filter(w => !shownOnly || !w.hidden).map(w => [w.name, w.value ?? null]))""",
            [node_id, shown_only],
        )

    def set_widget(self, node_id: int, name: str, value: object) -> None:
        """Set a widget as choosing from its menu or typing into it does: value, then its callback."""
        self.page.evaluate(
            """([id, name, value]) => {
                 const node = app.graph.getNodeById(id);
                 const widget = node.widgets.find(w => w.name === name);
                 widget.value = value;
                 widget.callback?.(value, app.canvas, node);
                 app.graph.setDirtyCanvas(true, true);
               }""",
            [node_id, name, value],
        )

    def api_payload(self) -> dict:
        """The API-format prompt the Run button would queue now."""
        return self.page.evaluate("async () => (await app.graphToPrompt()).output")

    def missing_node_types(self) -> list[str]:
        return self.page.evaluate(
            "() => app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type] || n.has_errors).map(n => n.type)"
        )

    def dialog_texts(self) -> list[str]:
        return self.page.evaluate("() => [...document.querySelectorAll('[role=dialog]')].map(d => d.innerText)")

    # --- acting like a user ------------------------------------------------------------------

    def canvas_point(self, node_id: int, widget_name: str | None = None) -> tuple[float, float]:
        """Page coordinates of a widget's centre (or of the node's title bar)."""
        return tuple(
            self.page.evaluate(
                """([id, name]) => {
                     const node = app.graph.getNodeById(id);
                     let x = node.pos[0] + node.size[0] / 2, y = node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2;
                     if (name) {
                       const widget = node.widgets.find(w => w.name === name);
                       x = node.pos[0] + node.size[0] * 0.75;
                       y = node.pos[1] + widget.y + (widget.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT) / 2;
                     }
                     const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([x, y]);
                     const rect = app.canvas.canvas.getBoundingClientRect();
                     const ratio = rect.width / app.canvas.canvas.width;
                     return [rect.left + cx * ratio, rect.top + cy * ratio];
                   }""",
                [node_id, widget_name],
            )
        )

    def vue_nodes_active(self) -> bool:
        """Whether this frontend knows Nodes 2.0 and has it on."""
        return bool(self.page.evaluate(f"() => app.extensionManager?.setting?.get('{VUE_NODES_SETTING}') === true"))

    def vue_widgets_addressable(self) -> bool:
        """Whether Nodes 2.0 marks widgets with ``data-widget-name`` (the early versions do not)."""
        self.page.evaluate("() => app.graph.add(LiteGraph.createNode('EmptyLatentImage'))")
        try:
            self.page.locator("[data-node-id] [data-widget-name]").first.wait_for(timeout=5000)
        except PlaywrightTimeout:
            return False
        return True

    def widget_element(self, node_id: int, widget_name: str):
        """A widget's DOM element under Nodes 2.0."""
        return self.page.locator(f'[data-node-id="{node_id}"] [data-widget-name="{widget_name}"]')

    def click_widget(self, node_id: int, widget_name: str) -> None:
        if self.vue_nodes:
            self.widget_element(node_id, widget_name).locator("button").first.click()
        else:
            self.page.mouse.click(*self.canvas_point(node_id, widget_name))
        self.page.wait_for_timeout(200)

    def context_menu(self, node_id: int, item: str) -> None:
        self.page.mouse.click(*self.canvas_point(node_id), button="right")
        self.page.locator(".litecontextmenu .litemenu-entry", has_text=item).first.click()
        self.page.wait_for_timeout(200)

    def search_and_add(self, display_name: str) -> list[str]:
        """Double-click the canvas, type into the node search, press Enter; returns the first result's text.

        Works with the search box of older frontends (PrimeVue autocomplete, "Search Nodes...") and with
        the default one of newer frontends (a combobox "Add a node..." over ``#results-list``)."""
        search = self.page.locator(NODE_SEARCH_INPUT).first
        for _ in range(20):  # the canvas takes a moment after start-up before it handles double-clicks
            self.page.mouse.dblclick(*self.empty_canvas_point())
            try:
                search.wait_for(timeout=1000)
                break
            except PlaywrightTimeout:
                self.page.keyboard.press("Escape")  # whatever opened instead, close it before trying again
                continue
        else:
            self.screenshot("search-did-not-open")
            raise AssertionError("double-clicking the canvas did not open the node search")
        search.fill(display_name)
        first = self.page.locator(NODE_SEARCH_RESULT).first
        first.wait_for()
        self.page.wait_for_timeout(300)  # the list settles after the last keystroke
        text = first.inner_text().split("\n")
        search.press("Enter")
        self.page.wait_for_timeout(300)
        return [line.strip() for line in text if line.strip()]

    def empty_canvas_point(self) -> tuple[float, float]:
        """A point of the canvas no node covers (a double-click on a node edits its title instead)."""
        return self.page.evaluate(
            """() => {
              const rect = app.canvas.canvas.getBoundingClientRect();
              const free = (x, y) => {
                try { return !app.graph.getNodeOnPos(...app.canvas.convertOffsetToCanvas([x - rect.left, y - rect.top])); }
                catch { return true; }
              };
              for (const [x, y] of [[700, 500], [400, 650], [1000, 650], [400, 300], [1000, 300]]) if (free(x, y)) return [x, y];
              return [700, 500];
            }"""
        )

    def open_template(self, name: str, section: str = PACK_NAME) -> None:
        """Templates (sidebar) -> a custom node set's section (this pack's by default) -> the workflow's card."""
        self.page.get_by_role("button", name="Templates").first.click()
        dialog = self.page.get_by_role("dialog")
        dialog.get_by_text(section, exact=True).click()
        card = dialog.get_by_test_id(f"template-workflow-{name}")
        card.scroll_into_view_if_needed()  # a card below the dialog's fold loads its picture once shown
        card.locator("img").first.wait_for()
        self.page.wait_for_function(
            "card => [...card.querySelectorAll('img')].some(img => img.complete && img.naturalWidth > 0)",
            arg=card.element_handle(),
        )
        card.click()
        dialog.wait_for(state="detached")
        self.page.wait_for_function("() => app.graph.nodes.length > 0")
        self.page.wait_for_timeout(500)

    def run(self) -> str:
        """Click Run; returns the prompt id the server gave the queued job."""
        with self.page.expect_response(re.compile(r"/api/prompt$")) as answer:
            self.page.get_by_role("button", name="Run", exact=True).first.click()
        response = answer.value
        assert response.ok, f"the server refused the queued prompt: {response.text()}"
        self.queued_prompt = response.request.post_data_json["prompt"]
        return response.json()["prompt_id"]
