"""The web extension in a real browser against a real ComfyUI server (``COMFYUI_PATH``, CPU).

A ComfyUI server with the pack (and its frontend, ``comfyui-frontend-package``) runs a workflow on a tiny
random-weight Wan 2.1: UNETLoader -> SpargeAttn Patch -> KSampler (4 steps) -> SpargeAttn Sparsity Map ->
Preview Image. The server runs with ``TRITON_INTERPRET=1``, so the pack's real kernel runs on the CPU
(slowly, in Triton's interpreter) and self-attention goes sparse. Headless Chromium (Debian's
``chromium`` + ``chromium-driver``, driven by Selenium from PyPI) loads the page, queues the workflow from
the UI, and the test checks what the patch node shows: one chart point per step, the per-layer strip and
the run summary, in the classic canvas, in the Vue node renderer, and for the node moved into a
subgraph (its execution id then reads "<subgraph node>:<node>"). Screenshots and the Preview Image's
picture go to ``tests/artifacts/`` (git-ignored).

Text conditioning comes from a test-only node (tests/comfy_test_nodes), since no Wan text encoder is
small enough to ship. Skipped, with the reason, without COMFYUI_PATH, Selenium or Chromium.
"""

import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from comfy_support import build_model, comfy_server, http_get as _get, http_post as _post, require_comfy

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
PACK_DIR = "ComfyUI-SpargeAttn"
MODEL_FILE = "spargeattn_tiny_wan.safetensors"
STEPS = 4
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_comfy()
    from safetensors.torch import save_file

    base = tmp_path_factory.mktemp("comfy_browser")
    nodes = base / "custom_nodes"
    nodes.mkdir()
    (nodes / PACK_DIR).symlink_to(ROOT, target_is_directory=True)
    (nodes / "spargeattn_test_nodes").symlink_to(ROOT / "tests" / "comfy_test_nodes", target_is_directory=True)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    weights = build_model("wan").model.diffusion_model.state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(base / "models" / "diffusion_models" / MODEL_FILE))
    # the kernel runs on the CPU, in Triton's interpreter
    with comfy_server(base, {"TRITON_INTERPRET": "1"}) as url:
        # no first-run template browser over the canvas
        _post(url + "/settings", {"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": False})
        yield url, base


@pytest.fixture(scope="module")
def browser(server):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install selenium (the browser test drives Chromium with it)")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            pytest.skip(f"{path} is missing: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,950",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def workflow() -> dict:
    """The test workflow in the frontend's (UI) format, laid out so that one screen shows it."""
    nodes, links = [], []

    def node(id_, type_, pos, size, widgets, inputs=(), outputs=()):
        nodes.append({"id": id_, "type": type_, "pos": pos, "size": size, "flags": {}, "order": id_, "mode": 0,
                      "properties": {}, "widgets_values": widgets,
                      "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
                      "outputs": [{"name": n, "type": t, "links": []} for n, t in outputs]})

    def link(src, src_slot, dst, dst_slot):
        link_id = len(links) + 1
        source = next(n for n in nodes if n["id"] == src)
        target = next(n for n in nodes if n["id"] == dst)
        source["outputs"][src_slot]["links"].append(link_id)
        target["inputs"][dst_slot]["link"] = link_id
        links.append([link_id, src, src_slot, dst, dst_slot, source["outputs"][src_slot]["type"]])

    node(1, "UNETLoader", [20, 40], [300, 90], [MODEL_FILE, "default"], outputs=[("MODEL", "MODEL")])
    node(2, "SpargeAttnPatch", [350, 40], [380, 420],
         ["topk", 0.5, 0.98, -0.1, 0.0, 0.3, 1.0, "", 0, True, "row-major", False],
         inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")])
    node(3, "SpargeAttnTestConditioning", [20, 180], [300, 110], [8],
         outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING")])
    node(4, "EmptyHunyuanLatentVideo", [20, 340], [300, 160], [128, 128, 9, 1], outputs=[("LATENT", "LATENT")])
    node(5, "KSampler", [760, 40], [300, 270], [1, "fixed", STEPS, 1.0, "euler", "simple", 1.0],
         inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")])
    node(6, "SpargeAttnSparsityMap", [760, 420], [300, 80], [],
         inputs=[("model", "MODEL"), ("samples", "LATENT")], outputs=[("IMAGE", "IMAGE")])
    node(7, "PreviewImage", [1090, 40], [380, 330], [], inputs=[("images", "IMAGE")])
    for src, src_slot, dst, dst_slot in [(1, 0, 2, 0), (2, 0, 5, 0), (3, 0, 5, 1), (3, 1, 5, 2), (4, 0, 5, 3),
                                         (2, 0, 6, 0), (5, 0, 6, 1), (6, 0, 7, 0)]:
        link(src, src_slot, dst, dst_slot)
    return {"last_node_id": 7, "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.9, "offset": [60, 80]}}, "version": 0.4}


APP = "const app = window.comfyAPI.app.app;"


def wait_for(driver, script, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def run_in_page(driver, body):
    """Run async JS (``body`` may await) and return its value or raise its error."""
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"(async () => {{ {APP} {body} }})().then(v => done({{ok: v === undefined ? null : v}}),"
        " e => done({error: String(e && e.stack || e)}));")
    if "error" in result:
        raise AssertionError(result["error"])
    return result["ok"]


PANEL_STATE = """
    const panel = document.querySelector('.spargeattn-panel');
    if (!panel) return null;
    const rect = panel.getBoundingClientRect();
    const covered = (el) => {  // something else is drawn over the middle of el
      const r = el.getBoundingClientRect();
      const top = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
      return top && (el === top || el.contains(top)) ? "" : (top ? `${top.tagName}.${top.className}` : "nothing");
    };
    return {
      steps: panel.dataset.steps,
      points: panel.querySelectorAll('.sa-chart .sa-point').length,
      denseSteps: panel.querySelectorAll('.sa-chart .sa-dense-step').length,
      layers: panel.querySelectorAll('.sa-strip .sa-layer').length,
      head: panel.querySelector('.sa-head').textContent,
      numbers: panel.querySelector('.sa-numbers').textContent,
      dense: panel.querySelector('.sa-dense').textContent,
      summary: panel.querySelector('.sa-summary').textContent,
      visible: rect.width > 100 && rect.height > 60 && getComputedStyle(panel).visibility !== 'hidden',
      heights: [...panel.children].map(c => Math.round(c.getBoundingClientRect().height)),
      covered: covered(panel.querySelector('.sa-chart')) + covered(panel.querySelector('.sa-summary')),
    };
"""


def panel_state(driver):
    return driver.execute_script(PANEL_STATE)


SUMMARY = re.compile(r"^4 steps · sparsity 0\.\d\d · est\. attention \d+\.\d× · \d+ dense calls \(.+\)$")


def queue_and_check(driver, url, shot, previous_summary=""):
    """Queue the loaded workflow from the page, wait for the run, check the patch node's panel; save a
    screenshot ``<shot>.png`` and the Preview Image's picture ``<shot>_sparsity_map.png``."""
    before = len(_get(url + "/history"))
    run_in_page(driver, "await app.queuePrompt(0, 1);")
    deadline = time.time() + 600
    while len(_get(url + "/history")) == before:
        assert time.time() < deadline, "the prompt did not finish within 600 s"
        time.sleep(0.5)
    entry = list(_get(url + "/history").values())[-1]
    assert entry["status"]["status_str"] == "success", entry["status"]
    wait_for(driver, "const s = document.querySelector('.spargeattn-panel .sa-summary');"
                     f"return s && s.textContent.length > 0 && s.textContent !== {json.dumps(previous_summary)}",
             30, "the new run's summary on the patch node")
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{shot}.png"))  # before the checks, to see what went wrong
    state = panel_state(driver)
    assert state["visible"] and all(h > 0 for h in state["heights"]) and not state["covered"], state
    assert state["steps"] == str(STEPS) and state["points"] == STEPS, state  # one point per step
    assert SUMMARY.match(state["summary"]), state["summary"]
    assert state["layers"] == 2, state  # the tiny Wan's 2 blocks
    assert state["numbers"].startswith("computed 0.") and "est. attention" in state["numbers"], state
    assert "cross-attention" in state["dense"], state
    # the heatmap reached Preview Image
    src = wait_for(driver, "const i = [...document.querySelectorAll('img')].find(i => i.src.includes('/view?') "
                           "&& i.naturalWidth > 300); return i && i.src", 60, "the sparsity map in Preview Image")
    with urllib.request.urlopen(src, timeout=30) as r:
        (ARTIFACTS / f"{shot}_sparsity_map.png").write_bytes(r.read())
    return state


def test_patch_node_shows_steps_and_summary_in_the_classic_canvas_and_the_vue_renderer(server, browser):
    url, base = server
    browser.get(url)
    # ready: node definitions registered, Vue app up, the start-up workflow opened (loading ours earlier
    # races with the frontend's own start-up and shows a spurious "missing nodes" dialog)
    wait_for(browser, "const app = window.comfyAPI?.app?.app; return !!(app && app.vueAppReady "
                      "&& window.LiteGraph?.registered_node_types?.SpargeAttnPatch "
                      "&& app.extensionManager?.workflow?.activeWorkflow)", 120, "the ComfyUI frontend")
    version = browser.execute_script("return window.__COMFYUI_FRONTEND_VERSION__ || null")
    print(f"comfyui-frontend-package {version}, {browser.capabilities.get('browserVersion')}")
    run_in_page(browser, f"await app.loadGraphData({json.dumps(workflow())});")
    wait_for(browser, "return !!document.querySelector('.spargeattn-panel')", 30, "the SpargeAttn panel on the patch node")
    assert panel_state(browser)["head"] == "Waiting for sampling…"
    # the panel is not saved with the workflow: one saved value per widget of the node's inputs
    saved, names = run_in_page(browser, """
        const node = app.graph.getNodeById(2);
        return [node.serialize().widgets_values, node.widgets.map(w => w.name)];""")
    assert "spargeattn_statistics" in names and len(saved) == len(names) - 1, (saved, names)

    classic = queue_and_check(browser, url, "browser_classic")
    assert classic["denseSteps"] == 2, classic  # start_percent 0.3: the first two steps stay dense
    assert classic["summary"].endswith("(8 cross-attention, 4 sigma outside the start/end window)"), classic

    run_in_page(browser, "await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true);")
    wait_for(browser, "return !!document.querySelector('[data-node-id]')", 30, "the Vue node renderer")
    wait_for(browser, "const p = document.querySelector('.spargeattn-panel'); return !!p && !!p.closest('[data-node-id]')",
             30, "the SpargeAttn panel inside a Vue node")
    # sparse from the first step on: the patch node runs again (a new state), its panel keeps working
    run_in_page(browser, "app.graph.getNodeById(2).widgets.find(w => w.name === 'start_percent').value = 0.0;")
    vue = queue_and_check(browser, url, "browser_vue", previous_summary=classic["summary"])
    assert vue["denseSteps"] == 0 and vue["summary"].endswith(" · 8 dense calls (cross-attention)"), vue

    # inside a subgraph the node's execution id is "<subgraph node id>:<node id>"
    execution_id = run_in_page(browser, """
        app.graph.convertToSubgraph(new Set([app.graph.getNodeById(2)]));
        const host = app.graph.nodes.find(n => n.subgraph?.nodes.some(m => m.type === 'SpargeAttnPatch'));
        const inner = host.subgraph.nodes.find(m => m.type === 'SpargeAttnPatch');
        inner.widgets.find(w => w.name === 'start_percent').value = 0.3;
        return `${host.id}:${inner.id}`;""")
    before = len(_get(url + "/history"))
    run_in_page(browser, "await app.queuePrompt(0, 1);")
    wait_for(browser, f"return fetch('/history').then(r => r.json()).then(h => Object.keys(h).length > {before})",
             600, "the subgraph run")
    panel = run_in_page(browser, f"""
        const [host, id] = {json.dumps(execution_id)}.split(':').map(Number);
        const inner = app.graph.getNodeById(host).subgraph.getNodeById(id);
        const el = inner.widgets.find(w => w.name === 'spargeattn_statistics').element;
        return {{steps: el.dataset.steps, points: el.querySelectorAll('.sa-point').length,
                 summary: el.querySelector('.sa-summary').textContent}};""")
    assert ":" in execution_id and panel["steps"] == str(STEPS) and panel["points"] == STEPS, panel
    assert panel["summary"] == classic["summary"], panel  # the same settings as the first run

    log = (base / "server.log").read_text()
    for node_id, state in (("2", classic), ("2", vue), (execution_id, panel)):
        assert log.count(f"SpargeAttn #{node_id}: {state['summary']}") == 1  # the summary is logged once per run
