"""Helpers for the tests that run the pack inside a real ComfyUI checkout (``COMFYUI_PATH``).

Nothing here imitates ComfyUI: models are built from ComfyUI's own model classes, loaded through
``comfy.sd.load_diffusion_model_state_dict`` and sampled with ``comfy.sample.sample``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


def require_comfy():
    """Put ComfyUI on ``sys.path`` (CPU mode without CUDA), or skip with the reason."""
    if not COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH not set: point it to a ComfyUI checkout to run the ComfyUI tests")
    if not os.path.isfile(os.path.join(COMFYUI_PATH, "comfy", "sd.py")):
        pytest.skip(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout (no comfy/sd.py)")
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    from comfy.cli_args import args

    args.cpu = args.cpu or not torch.cuda.is_available()


def build_model(kind: str, size: str = "tiny", dtype=torch.float32, seed: int = 0):
    """A random-weight diffusion model of ``kind`` ("flux", "wan", "hunyuan_video") as ComfyUI loads it.

    ``size="tiny"``: 2 heads x 128, one or two blocks. ``size="wan1.3b"`` (Wan only): the full
    Wan 2.1-1.3B shape (dim 1536, 12 heads x 128, 30 layers, ffn 8960).
    """
    require_comfy()
    import comfy.ops
    import comfy.sd
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    from comfy.ldm.wan.model import WanModel

    torch.manual_seed(seed)
    ops = comfy.ops.manual_cast
    with torch.device("meta" if size != "tiny" else "cpu"):
        if kind == "flux":
            net = Flux(image_model="flux", in_channels=16, out_channels=16, patch_size=2, hidden_size=256, num_heads=2,
                       axes_dim=[16, 56, 56], mlp_ratio=4.0, theta=10000, qkv_bias=True, txt_ids_dims=[],
                       context_in_dim=64, vec_in_dim=32, depth=1, depth_single_blocks=1, guidance_embed=True,
                       operations=ops)
        elif kind == "wan":
            shape = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2) if size == "tiny" else \
                dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
            net = WanModel(in_dim=16, out_dim=16, text_len=512, operations=ops, **shape)
        elif kind == "hunyuan_video":
            net = HunyuanVideo(image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2],
                               hidden_size=256, num_heads=2, axes_dim=[16, 56, 56], mlp_ratio=4.0, theta=256,
                               qkv_bias=True, context_in_dim=64, vec_in_dim=768, depth=1, depth_single_blocks=1,
                               guidance_embed=True, meanflow=False, byt5=False, use_cond_type_embedding=False,
                               vision_in_dim=None, meanflow_sum=False, operations=ops)
        else:
            raise ValueError(kind)
    state_dict = {}
    for name, tensor in net.state_dict().items():
        t = torch.empty(tensor.shape, dtype=dtype)
        state_dict[name] = t.normal_(0.0, 0.02) if name.endswith("weight") and t.ndim > 1 else t.normal_(0.0, 0.01)
    return comfy.sd.load_diffusion_model_state_dict(state_dict, model_options={"dtype": dtype})


def conditioning(kind: str, text_tokens: int = 8, seed: int = 1, device="cpu"):
    """Random positive/negative conditioning with the extras each model needs."""
    g = torch.Generator().manual_seed(seed)

    def cond():
        if kind == "wan":
            return [[torch.randn(1, text_tokens, 4096, generator=g), {}]]
        pooled = 32 if kind == "flux" else 768
        return [[torch.randn(1, text_tokens, 64, generator=g),
                 {"pooled_output": torch.randn(1, pooled, generator=g), "guidance": 3.5}]]

    return cond(), cond()


def latent_for(kind: str, frames: int = 3, height: int = 16, width: int = 16):
    """An empty latent: (1, 16, H, W) for Flux, (1, 16, T, H, W) for the video models."""
    return torch.zeros((1, 16, height, width) if kind == "flux" else (1, 16, frames, height, width))


def sample(model, kind: str, latent, steps: int = 2, cfg: float = 1.0, seed: int = 0, text_tokens: int = 8):
    """Sample with ComfyUI's own sampler (euler / simple); returns the latent."""
    import comfy.sample

    positive, negative = conditioning(kind, text_tokens)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                               disable_pbar=True, seed=seed)


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (what the frontend saves) to an API prompt, as the frontend does.

    Links become ``[source_id, output_slot]``; ``widgets_values`` are assigned, in order, to the
    node's widget inputs as listed by the server's ``/object_info`` (``input_order``: required, then
    optional), skipping the extra "control after generate" value that follows seed widgets. Muted
    nodes (mode 2) are dropped; bypassed nodes (mode 4) are refused, since rewiring them is not needed
    for the pack's workflows.
    """
    sources = {link[0]: (str(link[1]), link[2]) for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4:
            raise ValueError(f"node {node['id']} ({node['type']}) is bypassed; remove it or un-bypass it")
        info = object_info[node["type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name in order:
            spec = specs[name]
            if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES:
                if not values:
                    raise ValueError(f"node {node['id']} ({node['type']}): no widget value left for {name!r}")
                inputs[name] = values.pop(0)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    values.pop(0)
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values left over")
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                source, index = sources[slot["link"]]
                inputs[slot["name"]] = [source, index]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
