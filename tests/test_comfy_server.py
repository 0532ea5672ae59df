"""A real ComfyUI server (``COMFYUI_PATH``, CPU) loads the pack through its custom-node loader, lists
the node in ``/object_info``, and accepts every workflow in ``workflows/`` converted to an API prompt.

The model files the workflows name are empty placeholders: the server validates a prompt (node
types, links, widget values, model names) when it is queued; executing it is not part of this test,
so the queue is cleared right after.
"""

import json
from pathlib import Path

import pytest

from comfy_support import comfy_server, http_get as _get, http_post as _post, require_comfy, ui_to_api

ROOT = Path(__file__).resolve().parent.parent
# The CogVideoX workflow needs kijai's wrapper on the server: tests/test_comfy_cogvideox.py checks it.
WORKFLOWS = sorted(p for p in (ROOT / "workflows").glob("*.json") if not p.name.startswith("cogvideox_"))
PACK_DIR = "ComfyUI-SpargeAttn"


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
    with comfy_server(base) as url:
        yield url, base


def test_pack_loads_through_the_custom_node_loader(server):
    url, base = server
    info = _get(url + "/object_info")
    node = info["SpargeAttnPatch"]
    assert node["display_name"] == "SpargeAttn Patch" and node["output"] == ["MODEL"]
    assert node["input_order"]["required"] == [
        "model", "mode", "topk", "cdf_threshold", "sim_threshold", "pv_threshold", "start_percent",
        "end_percent", "dense_blocks", "min_tokens", "protect_text", "token_order", "verbose", "tuned", "precision"]
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
