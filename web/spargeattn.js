// SpargeAttn live statistics on the "SpargeAttn Patch" node: numbers of the latest step, a chart
// of sparsity per step, a per-layer strip and, after the run, the summary line.
//
// The panel is a DOM widget (node.addDOMWidget), not canvas drawing, so it shows in the classic
// LiteGraph canvas and in the Vue node renderer alike. Data handling lives in spargeattn_data.js.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  STEP_EVENT, SUMMARY_EVENT, addStep, addSummary, chartGeometry, emptyRun, layerStrip, resolveNode,
  statusLines, summaryText,
} from "./spargeattn_data.js";

const NODE_TYPE = "SpargeAttnPatch";
const SVG = "http://www.w3.org/2000/svg";
const CHART = { width: 300, height: 60, left: 20 };
const STRIP = { width: 300, height: 10 };
const MIN_HEIGHT = 180;
const GREEN = "#35b779";
const panels = new WeakMap(); // node -> {run, render}

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function div(className, style = {}) {
  const el = document.createElement("div");
  el.className = className;
  Object.assign(el.style, { flex: "0 0 auto" }, style);
  return el;
}

function createPanel() {
  const root = div("spargeattn-panel", {
    flex: "1 1 auto", display: "flex", flexDirection: "column", gap: "3px", padding: "4px 6px",
    boxSizing: "border-box", width: "100%", height: "100%", minHeight: `${MIN_HEIGHT}px`, overflow: "hidden",
    fontSize: "11px", lineHeight: "14px", fontFamily: "sans-serif",
    color: "var(--input-text, var(--fg-color, #ddd))",
  });
  const head = div("sa-head", { fontWeight: "600" });
  const numbers = div("sa-numbers");
  const dense = div("sa-dense", { opacity: "0.8", whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis" });
  const chart = svg("svg", { class: "sa-chart", viewBox: `0 0 ${CHART.width} ${CHART.height}` });
  Object.assign(chart.style, { width: "100%", height: "auto", flex: "0 0 auto", display: "block" });
  const stripRow = div("sa-strip-row", { display: "flex", alignItems: "center", gap: "4px" });
  const stripLabel = div("sa-strip-label", { opacity: "0.7", fontSize: "10px" });
  stripLabel.textContent = "layers";
  const strip = svg("svg", { class: "sa-strip", viewBox: `0 0 ${STRIP.width} ${STRIP.height}`, preserveAspectRatio: "none" });
  Object.assign(strip.style, { flex: "1 1 auto", height: "10px", display: "block", minWidth: "0" });
  stripRow.append(stripLabel, strip);
  const summary = div("sa-summary", { fontWeight: "600", whiteSpace: "normal" });
  root.append(head, numbers, dense, chart, stripRow, summary);

  function render(run) {
    const lines = statusLines(run);
    head.textContent = lines.head;
    numbers.textContent = lines.numbers;
    dense.textContent = lines.dense;
    dense.title = lines.dense;
    root.dataset.steps = String(run.steps.length);

    const g = chartGeometry(run.steps, CHART.width, CHART.height, { left: CHART.left });
    const rule = { x1: CHART.left, x2: CHART.width, stroke: "currentColor", "stroke-opacity": 0.25 };
    const label = (y, text) => svg("text", {
      x: CHART.left - 3, y: y + 3, "font-size": 9, "text-anchor": "end", fill: "currentColor", opacity: 0.6,
    }, text);
    chart.replaceChildren(
      svg("line", { ...rule, y1: g.y1, y2: g.y1 }),
      svg("line", { ...rule, y1: g.yHalf, y2: g.yHalf, "stroke-dasharray": "3 3" }),
      svg("line", { ...rule, y1: g.y0, y2: g.y0 }),
      label(g.y1, "1"), label(g.yHalf, ".5"), label(g.y0, "0"),
      svg("path", { d: g.path, fill: "none", stroke: GREEN, "stroke-width": 1.5 }),
    );
    for (const p of g.points) {
      const dot = svg("circle", {
        class: p.dense ? "sa-point sa-dense-step" : "sa-point", cx: p.x, cy: p.y, r: 2.5,
        fill: p.dense ? "none" : GREEN, stroke: p.dense ? "#999" : GREEN, "stroke-width": 1,
      });
      dot.append(svg("title", {}, p.dense ? `step ${p.step}: dense` : `step ${p.step}: sparsity ${p.sparsity.toFixed(3)}`));
      chart.append(dot);
    }
    chart.setAttribute("aria-label", `sparsity per step, ${run.steps.length} steps`);

    const cells = layerStrip(run.steps[run.steps.length - 1]);
    const w = STRIP.width / Math.max(cells.length, 1);
    strip.replaceChildren(...cells.map((c, i) => {
      const rect = svg("rect", { class: "sa-layer", x: i * w, y: 0, width: Math.max(w - 0.5, 0.5), height: STRIP.height, fill: c.colour });
      rect.append(svg("title", {}, `${c.name}: sparsity ${c.sparsity.toFixed(3)}`));
      return rect;
    }));
    stripRow.style.visibility = cells.length ? "visible" : "hidden";

    summary.textContent = summaryText(run);
  }

  render(emptyRun());
  return { root, render };
}

function update(detail, apply) {
  const node = resolveNode(app.rootGraph ?? app.graph, detail?.node);
  const entry = node && panels.get(node);
  if (!entry) return; // the node is not in the open workflow (or the extension has no panel for it)
  entry.run = apply(entry.run, detail);
  entry.render(entry.run);
  node.setDirtyCanvas?.(true, false);
}

app.registerExtension({
  name: "SpargeAttn.StepStatistics",
  setup() {
    api.addEventListener(STEP_EVENT, ({ detail }) => update(detail, addStep));
    api.addEventListener(SUMMARY_EVENT, ({ detail }) => update(detail, addSummary));
  },
  nodeCreated(node) {
    if (node.comfyClass !== NODE_TYPE) return;
    const panel = createPanel();
    const widget = node.addDOMWidget("spargeattn_statistics", "spargeattn-statistics", panel.root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => MIN_HEIGHT,
    });
    widget.serialize = false;
    panels.set(node, { run: emptyRun(), render: panel.render });
  },
});
