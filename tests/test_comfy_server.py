"""A real ComfyUI server (``COMFYUI_PATH``, CPU) loads the pack through its custom-node loader, lists
the node in ``/object_info``, and accepts every workflow in ``workflows/`` converted to an API prompt.

The model files the workflows name are empty placeholders: the server validates a prompt (node
types, links, widget values, model names) when it is queued; executing it is not part of this test,
so the queue is cleared right after.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from comfy_support import COMFYUI_PATH, require_comfy, ui_to_api

ROOT = Path(__file__).resolve().parent.parent
# The CogVideoX workflow needs kijai's wrapper on the server: tests/test_comfy_cogvideox.py checks it.
WORKFLOWS = sorted(p for p in (ROOT / "workflows").glob("*.json") if not p.name.startswith("cogvideox_"))
PACK_DIR = "ComfyUI-SpargeAttn"


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def _post(url, payload):
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _model_names(workflows):
    """(folder, file) of every model file the workflows load."""
    folders = {"unet_name": "diffusion_models", "clip_name": "text_encoders", "clip_name1": "text_encoders",
               "clip_name2": "text_encoders", "vae_name": "vae"}
    names = set()
    for wf in workflows:
        for node in json.loads(wf.read_text())["nodes"]:
            for value in node.get("widgets_values", []):
                if isinstance(value, str) and value.endswith(".safetensors"):
                    kind = {"UNETLoader": "unet_name", "VAELoader": "vae_name"}.get(node["type"], "clip_name")
                    names.add((folders[kind], value))
    return names


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_comfy()
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_DIR).symlink_to(ROOT, target_is_directory=True)
    for folder, name in _model_names(WORKFLOWS):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (base / "models" / folder / name).write_bytes(b"")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
         str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
        cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                _get(url + "/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, ValueError):
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"ComfyUI did not start; log in {base / 'server.log'}")
                time.sleep(1)
        yield url, base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_pack_loads_through_the_custom_node_loader(server):
    url, base = server
    info = _get(url + "/object_info")
    node = info["SpargeAttnPatch"]
    assert node["display_name"] == "SpargeAttn Patch" and node["output"] == ["MODEL"]
    assert node["input_order"]["required"] == [
        "model", "mode", "topk", "cdf_threshold", "sim_threshold", "pv_threshold", "start_percent",
        "end_percent", "dense_blocks", "min_tokens", "protect_text", "token_order", "verbose", "tuned"]
    assert node["input"]["required"]["tuned"][1]["options"] == ["none"]  # no file in models/spargeattn yet
    assert {"SpargeAttnTune", "SpargeAttnSaveTuned"} <= set(info)
    required = node["input"]["required"]
    for name in ("topk", "cdf_threshold", "sim_threshold", "pv_threshold", "start_percent", "end_percent",
                 "min_tokens"):
        assert required[name][1]["display"] == "slider" and required[name][1]["tooltip"]
    assert "bypass" in node["description"]
    log = (base / "server.log").read_text()
    times = log.split("Import times for custom nodes:")[-1].split("\n\n")[0]
    assert f"custom_nodes/{PACK_DIR}" in times and "(IMPORT FAILED)" not in times


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_converts_to_a_prompt_the_server_accepts(server, workflow):
    url, _ = server
    info = _get(url + "/object_info")
    prompt = ui_to_api(json.loads(workflow.read_text()), info)
    assert any(n["class_type"] == "SpargeAttnPatch" for n in prompt.values())
    status, body = _post(url + "/prompt", {"prompt": prompt, "client_id": "spargeattn-test"})
    _post(url + "/queue", {"clear": True})
    _post(url + "/interrupt", {})
    assert status == 200, body
    assert body.get("node_errors") == {} and body.get("prompt_id")
