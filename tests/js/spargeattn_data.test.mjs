// Unit tests of web/spargeattn_data.js (the SpargeAttn panel's data handling): `node --test tests/js`.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  NO_DATA, addStep, addSummary, chartGeometry, colour, denseText, emptyRun, isStepPayload, layerStrip,
  resolveNode, statusLines, summaryText,
} from "../../web/spargeattn_data.js";

// A message as nodes/ui.py step_payload() builds it.
function step(i, sparsity = 0.6, extra = {}) {
  return {
    node: "5", step: i, sigma: 1 - i / 10, sparsity, computed: sparsity === null ? null : 1 - sparsity,
    pv_skipped: sparsity === null ? null : 0.05, speedup: sparsity === null ? 1.0 : 2.2, sparse_calls: sparsity === null ? 0 : 2,
    dense_calls: { "cross-attention": 2 }, layers: sparsity === null ? [] : [["block.0", 0.5], ["block.1", 0.7]],
    ...extra,
  };
}

const summary = {
  node: "5", steps: 3, sparsity: 0.6, computed: 0.4, pv_skipped: 0.0, speedup: 2.2, sparse_calls: 6,
  dense_calls: { "cross-attention": 6 }, line: "3 steps · sparsity 0.60 · est. attention 2.2× · 6 dense calls (cross-attention)",
};

test("steps accumulate, one point per step, and a new run starts afresh", () => {
  let run = emptyRun();
  for (const i of [0, 1, 2]) run = addStep(run, step(i));
  assert.deepEqual(run.steps.map((s) => s.step), [0, 1, 2]);
  assert.equal(chartGeometry(run.steps, 300, 72).points.length, 3);
  run = addSummary(run, summary);
  assert.equal(summaryText(run), summary.line);
  assert.equal(run.steps.length, 3, "the summary keeps the steps on show");
  run = addStep(run, step(0));
  assert.deepEqual(run.steps.map((s) => s.step), [0]);
  assert.equal(summaryText(run), "");
  run = addStep(addStep(run, step(1)), step(1)); // a repeated index = a new sampling pass
  assert.deepEqual(run.steps.map((s) => s.step), [1]);
});

test("a step after a summary starts a new run even if its index continues", () => {
  const run = addStep(addSummary(addStep(emptyRun(), step(0)), summary), step(4));
  assert.deepEqual(run.steps.map((s) => s.step), [4]);
});

test("malformed messages are refused, the run is unchanged", () => {
  const run = addStep(emptyRun(), step(0));
  for (const bad of [null, {}, step(-1), step(1.5), { ...step(1), node: 5 }, { ...step(1), sparsity: "0.5" },
    { ...step(1), layers: undefined }, { ...step(1), speedup: Number.NaN }]) {
    assert.equal(isStepPayload(bad), false);
    assert.throws(() => addStep(run, bad), TypeError);
  }
  assert.throws(() => addSummary(run, { node: "5", steps: 1 }), TypeError);
  assert.equal(run.steps.length, 1);
});

test("chart geometry: y follows sparsity on a 0..1 axis, dense steps are marked and left out of the path", () => {
  const steps = [step(0, null), step(1, 0.0), step(2, 0.5), step(3, 1.0)];
  const g = chartGeometry(steps, 300, 72, { pad: 6 });
  assert.deepEqual(g.points.map((p) => p.x), [6, 102, 198, 294]);
  assert.deepEqual(chartGeometry(steps, 318, 72, { left: 18, pad: 6 }).points.map((p) => p.x), [24, 120, 216, 312]);
  assert.deepEqual(g.points.map((p) => p.dense), [true, false, false, false]);
  assert.equal(g.points[0].y, g.y0);
  assert.equal(g.points[1].y, 66);
  assert.equal(g.points[2].y, 36);
  assert.equal(g.points[3].y, 6);
  assert.equal(g.y1, 6);
  assert.equal(g.path, "M102.0 66.0 L198.0 36.0 L294.0 6.0");
  const one = chartGeometry([step(0)], 300, 72, { pad: 6 });
  assert.equal(one.points.length, 1);
  assert.match(one.path, /^M6\.0 /);
  assert.equal(chartGeometry([], 300, 72).path, "");
});

test("status lines of the latest step, and before any", () => {
  assert.equal(statusLines(emptyRun()).head, "Waiting for sampling…");
  const run = addStep(addStep(emptyRun(), step(0)), step(1, 0.62, { dense_calls: { "dense block": 2, "cross-attention": 4 } }));
  const lines = statusLines(run);
  assert.equal(lines.head, "step 1 (σ 0.900) · 2 sparse calls");
  assert.equal(lines.numbers, "computed 0.38 · P·V skipped 0.05 · est. attention 2.2×");
  assert.equal(lines.dense, "dense: 4 cross-attention, 2 dense block");
  const dense = statusLines(addStep(emptyRun(), step(0, null, { dense_calls: { "not CUDA": 2 } })));
  assert.equal(dense.numbers, "all attention dense this step");
  assert.equal(dense.dense, "dense: 2 not CUDA");
});

test("dense text sorts by count then name and says none", () => {
  assert.equal(denseText({}), "none");
  assert.equal(denseText({ b: 1, a: 1, c: 3, z: 0 }), "3 c, 1 a, 1 b");
});

test("colour scale: fixed ends, clipping, grey for missing, lightness rising", () => {
  assert.equal(colour(0), "rgb(68, 1, 84)");
  assert.equal(colour(1), "rgb(253, 231, 37)");
  assert.equal(colour(-1), colour(0));
  assert.equal(colour(2), colour(1));
  assert.equal(colour(null), NO_DATA);
  assert.equal(colour(Number.NaN), NO_DATA);
  const light = (c) => {
    const [r, g, b] = c.match(/\d+/g).map(Number);
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  let previous = -1;
  for (let v = 0; v <= 1.0001; v += 0.01) {
    const l = light(colour(v));
    assert.ok(l > previous, `lightness at ${v}`);
    previous = l;
  }
});

test("layer strip cells in call order with their colours", () => {
  const cells = layerStrip(step(0));
  assert.deepEqual(cells.map((c) => c.name), ["block.0", "block.1"]);
  assert.equal(cells[1].colour, colour(0.7));
  assert.deepEqual(layerStrip(undefined), []);
});

test("execution ids resolve through subgraphs", () => {
  const graph = (nodes) => ({ getNodeById: (id) => nodes[id] });
  const inner = { id: 5, title: "inner patch" };
  const sub = { id: 12, subgraph: graph({ 5: inner }) };
  const root = graph({ 5: { id: 5, title: "root patch" }, 12: sub, 3: { id: 3 } });
  assert.equal(resolveNode(root, "5").title, "root patch");
  assert.equal(resolveNode(root, "12:5"), inner);
  assert.equal(resolveNode(root, "12:7"), null);
  assert.equal(resolveNode(root, "3:5"), null, "node 3 has no subgraph");
  assert.equal(resolveNode(root, "99"), null);
  assert.equal(resolveNode(null, "5"), null);
});
