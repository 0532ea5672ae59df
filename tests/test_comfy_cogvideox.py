"""A real ComfyUI server (``COMFYUI_PATH``, CPU) with the pack and kijai's ComfyUI-CogVideoXWrapper
(``COGVIDEOX_WRAPPER_PATH``) in its custom_nodes: both load, the "SpargeAttn CogVideoX" node is listed with
the wrapper's model type, and every ``workflows/cogvideox_*.json`` converts to a prompt the server accepts
(node types, links, socket types, widget values). Executing the workflows needs the real weights and is
not part of this test: the queue is cleared right away, and the server runs with ``HF_HUB_OFFLINE=1`` so
the wrapper's download loader never reaches the network. Skipped, with the reason, without both paths.
"""

import json
from pathlib import Path

import pytest

from comfy_support import cogvideox_wrapper_path, comfy_server, http_get as _get, http_post as _post, ui_to_api

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "workflows").glob("cogvideox_*.json"))
TEXT_ENCODER = "t5xxl_fp16.safetensors"  # what the workflows' CLIPLoader names (an empty placeholder here)
UNET = "placeholder_unet.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    wrapper = cogvideox_wrapper_path()
    base = tmp_path_factory.mktemp("comfy_cogvideox")
    nodes = base / "custom_nodes"
    nodes.mkdir()
    (nodes / "ComfyUI-SpargeAttn").symlink_to(ROOT, target_is_directory=True)
    (nodes / "ComfyUI-CogVideoXWrapper").symlink_to(wrapper, target_is_directory=True)
    for folder, name in (("text_encoders", TEXT_ENCODER), ("diffusion_models", UNET)):
        (base / "models" / folder).mkdir(parents=True)
        (base / "models" / folder / name).write_bytes(b"")
    with comfy_server(base, {"HF_HUB_OFFLINE": "1"}) as url:
        yield url, base


def test_pack_and_wrapper_load_and_the_node_takes_the_wrapper_model(server):
    url, base = server
    info = _get(url + "/object_info")
    node, patch = info["SpargeAttnCogVideoX"], info["SpargeAttnPatch"]
    assert node["display_name"] == "SpargeAttn CogVideoX" and node["category"] == "SpargeAttn"
    assert node["input"]["required"]["model"][0] == "COGVIDEOMODEL" and node["output"] == ["COGVIDEOMODEL"]
    assert info["CogVideoSampler"]["input"]["required"]["model"][0] == "COGVIDEOMODEL"
    options = node["input_order"]["required"][1:]
    assert options == ["mode", "topk", "cdf_threshold", "sim_threshold", "pv_threshold", "start_percent",
                       "end_percent", "dense_blocks", "min_tokens", "protect_text", "token_order", "verbose",
                       "precision"]
    for name in options:  # the patch node's widgets, defaults and tooltips; text protection worded for CogVideoX
        ours, theirs = node["input"]["required"][name], patch["input"]["required"][name]
        assert ours[1]["default"] == theirs[1]["default"]
        assert (ours[1]["tooltip"] == theirs[1]["tooltip"]) == (name != "protect_text")
    assert "226" in node["input"]["required"]["protect_text"][1]["tooltip"] and "bypass" in node["description"]
    log = (base / "server.log").read_text()
    times = log.split("Import times for custom nodes:")[-1].split("\n\n")[0]
    for pack in ("ComfyUI-SpargeAttn", "ComfyUI-CogVideoXWrapper"):
        assert f"custom_nodes/{pack}" in times
    assert "(IMPORT FAILED)" not in times


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_converts_to_a_prompt_the_server_accepts(server, workflow):
    url, _ = server
    info = _get(url + "/object_info")
    prompt = ui_to_api(json.loads(workflow.read_text()), info)
    types = {n["class_type"] for n in prompt.values()}
    assert "SpargeAttnCogVideoX" in types and "CogVideoSampler" in types
    assert types & {"DownloadAndLoadCogVideoModel", "CogVideoXModelLoader"}
    status, body = _post(url + "/prompt", {"prompt": prompt, "client_id": "spargeattn-test"})
    _post(url + "/queue", {"clear": True})
    _post(url + "/interrupt", {})
    assert status == 200, body
    assert body.get("node_errors") == {} and body.get("prompt_id")


def test_the_server_refuses_a_comfyui_model_on_the_cogvideox_socket(server):
    """The COGVIDEOMODEL socket type is really checked: a MODEL from UNETLoader is refused, naming our node."""
    url, _ = server
    info = _get(url + "/object_info")
    prompt = ui_to_api(json.loads(WORKFLOWS[0].read_text()), info)
    ours = next(k for k, n in prompt.items() if n["class_type"] == "SpargeAttnCogVideoX")
    prompt["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": "default"}}
    prompt[ours]["inputs"]["model"] = ["unet", 0]
    status, body = _post(url + "/prompt", {"prompt": prompt, "client_id": "spargeattn-test"})
    _post(url + "/queue", {"clear": True})
    assert status == 400 and ours in body.get("node_errors", {}), body
    assert [e["type"] for e in body["node_errors"][ours]["errors"]] == ["return_type_mismatch"]
