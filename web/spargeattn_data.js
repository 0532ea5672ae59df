// Data handling of the SpargeAttn step panel: pure functions, no DOM and no ComfyUI import, so that
// `node --test tests/js` checks them. The server sends (nodes/ui.py):
//   "spargeattn.step":    {node, step, sigma, sparsity, computed, pv_skipped, speedup, sparse_calls,
//                          dense_calls: {reason: count}, layers: [[name, sparsity], ...]}
//   "spargeattn.summary": {node, steps, sparsity, computed, pv_skipped, speedup, sparse_calls,
//                          dense_calls, line}
// `node` is the patch node's execution id: "5" in the root graph, "12:5" inside subgraph node 12.

export const STEP_EVENT = "spargeattn.step";
export const SUMMARY_EVENT = "spargeattn.summary";

// Viridis sampled at 0, 1/9, ..., 1 (the same scale as the Sparsity Map node's heatmap).
const PALETTE = [
  [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37],
];
export const NO_DATA = "rgb(190, 190, 190)";

/** CSS colour of a value in [0, 1] (clipped); null or NaN gives the "no data" grey. */
export function colour(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return NO_DATA;
  const x = Math.min(Math.max(value, 0), 1) * (PALETTE.length - 1);
  const i = Math.min(Math.floor(x), PALETTE.length - 2);
  const t = x - i;
  const rgb = PALETTE[i].map((c, k) => Math.round(c + (PALETTE[i + 1][k] - c) * t));
  return `rgb(${rgb.join(", ")})`;
}

/** The panel's state before any message. */
export function emptyRun() {
  return { steps: [], summary: null };
}

function isNumberOrNull(x) {
  return x === null || (typeof x === "number" && Number.isFinite(x));
}

/** True when `p` has the shape of a "spargeattn.step" message. */
export function isStepPayload(p) {
  return !!p && typeof p.node === "string" && Number.isInteger(p.step) && p.step >= 0 &&
    isNumberOrNull(p.sparsity) && isNumberOrNull(p.computed) && isNumberOrNull(p.pv_skipped) &&
    isNumberOrNull(p.speedup) && typeof p.dense_calls === "object" && p.dense_calls !== null &&
    Array.isArray(p.layers);
}

/** True when `p` has the shape of a "spargeattn.summary" message. */
export function isSummaryPayload(p) {
  return !!p && typeof p.node === "string" && Number.isInteger(p.steps) && typeof p.line === "string";
}

/**
 * The run with one more step. A step that does not continue the run (index 0 again, an index not
 * above the last one, or any step after a summary) starts a new run: a new sampling pass.
 */
export function addStep(run, payload) {
  if (!isStepPayload(payload)) throw new TypeError("not a spargeattn.step message");
  const last = run.steps.length ? run.steps[run.steps.length - 1].step : -1;
  const steps = run.summary || payload.step <= last ? [] : run.steps;
  return { steps: [...steps, payload], summary: null };
}

/** The run with its summary. */
export function addSummary(run, payload) {
  if (!isSummaryPayload(payload)) throw new TypeError("not a spargeattn.summary message");
  return { steps: run.steps, summary: payload };
}

function fmt(x, digits = 2) {
  return x === null || x === undefined ? "–" : x.toFixed(digits);
}

/** Dense calls by reason, most frequent first: "6 cross-attention, 2 dense block" or "none". */
export function denseText(denseCalls) {
  const entries = Object.entries(denseCalls).filter(([, n]) => n > 0);
  if (!entries.length) return "none";
  entries.sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
  return entries.map(([reason, n]) => `${n} ${reason}`).join(", ");
}

/** The lines the panel shows for the latest step (or a hint before the first one). */
export function statusLines(run) {
  if (!run.steps.length) return { head: "Waiting for sampling…", numbers: "", dense: "" };
  const s = run.steps[run.steps.length - 1];
  const sigma = s.sigma === null || s.sigma === undefined ? "" : ` (σ ${s.sigma.toPrecision(3)})`;
  const numbers = s.computed === null
    ? "all attention dense this step"
    : `computed ${fmt(s.computed)} · P·V skipped ${fmt(s.pv_skipped)} · est. attention ${fmt(s.speedup, 1)}×`;
  return {
    head: `step ${s.step}${sigma} · ${s.sparse_calls} sparse calls`,
    numbers,
    dense: `dense: ${denseText(s.dense_calls)}`,
  };
}

/**
 * Geometry of the sparsity-per-step chart inside a `width` x `height` box, leaving `left` pixels
 * for the axis labels: one point per step (x by order, y = sparsity on a 0..1 axis), a path through
 * the steps that had sparse calls, and steps with none marked `dense` at sparsity 0.
 */
export function chartGeometry(steps, width, height, { left = 0, pad = 6 } = {}) {
  const slots = Math.max(steps.length - 1, 1);
  const x = (i) => left + pad + ((width - left - 2 * pad) * i) / slots;
  const y = (v) => pad + (height - 2 * pad) * (1 - v);
  const points = steps.map((s, i) => ({
    x: x(i), y: y(s.sparsity ?? 0), step: s.step, sparsity: s.sparsity, dense: s.sparsity === null,
  }));
  const drawn = points.filter((p) => !p.dense);
  const path = drawn.map((p, i) => `${i ? "L" : "M"}${p.x.toFixed(1)} ${p.y.toFixed(1)}`).join(" ");
  return { points, path, y0: y(0), y1: y(1), yHalf: y(0.5) };
}

/** Cells of the per-layer strip of a step: [{name, sparsity, colour}], in call order. */
export function layerStrip(step) {
  if (!step) return [];
  return step.layers.map(([name, sparsity]) => ({ name, sparsity, colour: colour(sparsity) }));
}

/** Summary line after the run ("" while running). */
export function summaryText(run) {
  return run.summary ? run.summary.line : "";
}

/**
 * The node with execution id `id` ("5", or "12:5" = node 5 inside the subgraph of node 12) in
 * `rootGraph` (anything with getNodeById; subgraph nodes have `.subgraph`), or null.
 */
export function resolveNode(rootGraph, id) {
  const path = String(id).split(":");
  let graph = rootGraph;
  let node = null;
  for (let i = 0; i < path.length; i++) {
    if (!graph || typeof graph.getNodeById !== "function") return null;
    node = graph.getNodeById(/^\d+$/.test(path[i]) ? Number(path[i]) : path[i]) ?? null;
    if (!node) return null;
    graph = i < path.length - 1 ? node.subgraph : null;
  }
  return node;
}
