// Multi-LoRA Loader in the graph editor: show only the LoRA rows in use, add and remove rows, and
// show each LoRA's trigger words from its file's metadata.
//
// The node keeps its fixed scalar inputs lora_i / strength_i / enabled_i (i = 1..8), so saved
// workflows and API payloads stay plain values. Rows past the shown count are hidden, reset to
// their defaults and left out of the queued API payload (the node treats a missing row as empty).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

// the node id, and the id workflows saved before the pack prefixed its ids still carry (a hidden alias)
const NODE_TYPES = new Set(["LoRAtorioMultiLoRALoader", "MultiLoRALoader"]);
const NO_LORA = "None";
const ROW_FIELDS = ["lora", "strength", "enabled"];
const ROWS_PROPERTY = "loratorio_rows";
const ADD_BUTTON = "+ Add LoRA";
const REMOVE_BUTTON = "- Remove last LoRA";
const TRIGGER_WIDGET = "trigger_words";
const TRIGGER_LINE_HEIGHT = 16;

const triggerWordsByName = new Map();

/** The trigger words the server reads from a LoRA file's metadata (cached per file name). */
function fetchTriggerWords(name) {
  if (!triggerWordsByName.has(name)) {
    const request = api
      .fetchApi(`/loratorio/lora_info?name=${encodeURIComponent(name)}`)
      .then((response) => response.json())
      .then((info) => info.trigger_words ?? [])
      .catch(() => []);
    triggerWordsByName.set(name, request);
  }
  return triggerWordsByName.get(name);
}

function rowCount(node) {
  return node.widgets.filter((widget) => /^lora_\d+$/.test(widget.name)).length;
}

function rowWidgets(node, row) {
  return ROW_FIELDS.map((field) => node.widgets.find((widget) => widget.name === `${field}_${row}`));
}

function loraName(node, row) {
  return rowWidgets(node, row)[0]?.value ?? NO_LORA;
}

/** The last row that names a LoRA (0 when none does). */
function lastUsedRow(node) {
  for (let row = rowCount(node); row >= 1; row--) {
    if (loraName(node, row) !== NO_LORA) return row;
  }
  return 0;
}

function shownRows(node) {
  return node.properties[ROWS_PROPERTY];
}

function setShownRows(node, rows) {
  node.properties[ROWS_PROPERTY] = Math.max(1, Math.min(rowCount(node), rows));
  applyRowVisibility(node);
}

// The frontend skips hidden widgets when drawing but still gives them height in the layout.
const NO_HEIGHT = () => [0, -4];

function setRowWidgetShown(widget, shown) {
  widget.hidden = !shown;
  if (shown) delete widget.computeSize;
  else widget.computeSize = NO_HEIGHT;
  widget.options ??= {};
  widget.options.serialize = shown; // hidden rows stay out of the API payload
}

function applyRowVisibility(node) {
  const rows = shownRows(node);
  for (let row = 1; row <= rowCount(node); row++) {
    for (const widget of rowWidgets(node, row)) {
      if (widget) setRowWidgetShown(widget, row <= rows);
    }
  }
  const add = node.widgets.find((widget) => widget.name === ADD_BUTTON);
  const remove = node.widgets.find((widget) => widget.name === REMOVE_BUTTON);
  if (add) add.disabled = rows >= rowCount(node);
  if (remove) remove.disabled = rows <= 1;
  refreshTriggerWords(node);
  fitHeight(node);
}

function fitHeight(node) {
  node.setSize([node.size[0], node.computeSize()[1]]);
  node.setDirtyCanvas(true, true);
}

function setRowValues(node, row, values) {
  rowWidgets(node, row).forEach((widget, index) => {
    if (widget) widget.value = values[index];
  });
}

function rowDefaults(node) {
  return node.constructor.loratorioRowDefaults ?? [NO_LORA, 1.0, true];
}

/** Remove one row: later rows move up, the freed last row goes back to its defaults. */
function removeRow(node, row) {
  const rows = shownRows(node);
  for (let target = row; target < rows; target++) {
    setRowValues(node, target, rowWidgets(node, target + 1).map((widget) => widget.value));
  }
  setRowValues(node, rows, rowDefaults(node));
  setShownRows(node, rows - 1);
}

function addRow(node) {
  const next = shownRows(node) + 1;
  if (next > rowCount(node)) return;
  setRowValues(node, next, rowDefaults(node));
  setShownRows(node, next);
}

async function refreshTriggerWords(node) {
  const widget = node.widgets.find((candidate) => candidate.name === TRIGGER_WIDGET);
  if (!widget) return;
  const lines = [];
  for (let row = 1; row <= shownRows(node); row++) {
    const name = loraName(node, row);
    if (name === NO_LORA) continue;
    const words = await fetchTriggerWords(name);
    if (words.length) lines.push(`${row}: ${words.join(", ")}`);
  }
  widget.value = lines.join("\n");
  widget.hidden = lines.length === 0;
  fitHeight(node);
}

/** A read-only widget listing each row's trigger words; never saved or sent. */
function triggerWordsWidget() {
  return {
    name: TRIGGER_WIDGET,
    type: "loratorio_trigger_words",
    value: "",
    hidden: true,
    serialize: false,
    options: { serialize: false },
    computeSize(width) {
      if (!this.value) return NO_HEIGHT();
      return [width, 8 + (this.value.split("\n").length + 1) * TRIGGER_LINE_HEIGHT];
    },
    draw(ctx, node, width, y) {
      ctx.save();
      ctx.font = "12px sans-serif";
      ctx.textAlign = "left";
      ctx.fillStyle = LiteGraph.WIDGET_SECONDARY_TEXT_COLOR ?? "#999";
      ctx.fillText("Trigger words", 15, y + TRIGGER_LINE_HEIGHT);
      ctx.fillStyle = LiteGraph.WIDGET_TEXT_COLOR ?? "#ddd";
      this.value.split("\n").forEach((line, index) => {
        ctx.fillText(line, 15, y + (index + 2) * TRIGGER_LINE_HEIGHT, width - 30);
      });
      ctx.restore();
    },
  };
}

function addControls(node) {
  const buttons = [
    [ADD_BUTTON, () => addRow(node)],
    [REMOVE_BUTTON, () => removeRow(node, shownRows(node))],
  ];
  for (const [label, action] of buttons) {
    const button = node.addWidget("button", label, null, action, { serialize: false });
    button.serialize = false;
  }
  node.addCustomWidget(triggerWordsWidget());
  for (let row = 1; row <= rowCount(node); row++) {
    const lora = rowWidgets(node, row)[0];
    const userCallback = lora.callback;
    lora.callback = function (...args) {
      const result = userCallback?.apply(this, args);
      refreshTriggerWords(node);
      return result;
    };
  }
}

function rowDefaultsFromDefinition(nodeData) {
  const optional = nodeData.input?.optional ?? {};
  const defaultOf = (name, fallback) => optional[name]?.[1]?.default ?? fallback;
  return [defaultOf("lora_1", NO_LORA), defaultOf("strength_1", 1.0), defaultOf("enabled_1", true)];
}

app.registerExtension({
  name: "loratorio.MultiLoRALoader",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;
    nodeType.loratorioRowDefaults = rowDefaultsFromDefinition(nodeData);

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      addControls(this);
      setShownRows(this, 1);
      return result;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const result = onConfigure?.apply(this, args);
      // Workflows saved without this extension have no row count: show every row up to the last LoRA.
      setShownRows(this, Math.max(this.properties[ROWS_PROPERTY] ?? 1, lastUsedRow(this)));
      return result;
    };

    const getExtraMenuOptions = nodeType.prototype.getExtraMenuOptions;
    nodeType.prototype.getExtraMenuOptions = function (canvas, options) {
      const result = getExtraMenuOptions?.apply(this, [canvas, options]);
      for (let row = shownRows(this); row >= 1 && shownRows(this) > 1; row--) {
        options.unshift({ content: `Remove LoRA row ${row} (${loraName(this, row)})`, callback: () => removeRow(this, row) });
      }
      return result;
    };
  },
});
