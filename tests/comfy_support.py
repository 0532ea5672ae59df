"""Helpers for the tests that run the pack inside a real ComfyUI checkout (``COMFYUI_PATH``).

Nothing here imitates ComfyUI: models are built from ComfyUI's own model classes, loaded through
``comfy.sd.load_diffusion_model_state_dict`` and sampled with ``comfy.sample.sample``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn.functional as F

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


def http_get(url: str):
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def http_post(url: str, payload: dict):
    """POST ``payload`` as JSON; returns (HTTP status, decoded body), also for error statuses."""
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@contextlib.contextmanager
def comfy_server(base, env: dict | None = None, timeout_s: float = 180):
    """Run ComfyUI's own ``main.py`` (CPU, in-memory database) with ``base`` as its base directory on
    a free local port; yields the server's URL. Its log goes to ``base/server.log``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(base, "server.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
         str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
        cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                http_get(url + "/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, ValueError):
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"ComfyUI did not start; log in {os.path.join(base, 'server.log')}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


class RecordingKernel:
    """Exact attention with ``kernels.sparge_attn``'s signature; records each call. Injected into the
    patch's state where a test needs the sparse path on a CPU (``override`` is ``nodes.override``)."""

    def __init__(self, override):
        self.calls = []
        self.api = override.KernelAPI(self.attn, lambda device: None, range(1, 257))

    def attn(self, q, k, v, *, layout, scale, keep_ranges, return_stats, rope=None, **options):
        self.calls.append(dict(shape=tuple(q.shape), layout=layout, keep_ranges=keep_ranges, rope=rope is not None,
                               **options))
        if rope is not None:  # what the kernel does with it (kernels.reference.apply_rope is its specification)
            from sparge_pack.kernels.reference import apply_rope

            q, k = (apply_rope(x, rope, layout).to(x.dtype) for x in (q, k))
        t = (lambda x: x) if layout == "HND" else (lambda x: x.transpose(1, 2))
        out = t(F.scaled_dot_product_attention(t(q), t(k), t(v), scale=scale))
        h = q.shape[1] if layout == "HND" else q.shape[2]
        return out, {"density": torch.full((h,), options["topk"]), "pv_skipped": torch.zeros(h)}


# Constructor arguments per (kind, size) besides those shared by every size (see build_model).
SIZES = {
    ("flux", "tiny"): dict(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=64,
                           vec_in_dim=32),
    # Flux.1 [dev]: hidden 3072, 24 heads x 128, 19 double + 38 single blocks, T5-XXL 4096, CLIP-L 768.
    ("flux", "full"): dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38, context_in_dim=4096,
                           vec_in_dim=768),
    ("wan", "tiny"): dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2),
    ("wan", "wan1.3b"): dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    ("wan", "wan14b"): dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    ("hunyuan_video", "tiny"): dict(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=64,
                                    vec_in_dim=768),
    # HunyuanVideo (T2V, 13B): hidden 3072, 24 heads x 128, 20 double + 40 single blocks, LLaVA-Llama 4096, CLIP-L 768.
    ("hunyuan_video", "full"): dict(hidden_size=3072, num_heads=24, depth=20, depth_single_blocks=40,
                                    context_in_dim=4096, vec_in_dim=768),
}


def _is_norm_scale(name: str, tensor) -> bool:
    """1-D weights of normalisation layers (RMSNorm ``scale``, ``norm_q.weight``, LayerNorm weights)."""
    leaf = name.rsplit(".", 2)
    return tensor.ndim == 1 and "norm" in ".".join(leaf[-2:]) and leaf[-1] in ("weight", "scale")


def build_model(kind: str, size: str = "tiny", dtype=torch.float32, seed: int = 0, device="cpu",
                norm_scale: float | None = None):
    """A random-weight diffusion model of ``kind`` ("flux", "wan", "hunyuan_video") as ComfyUI loads it.

    ``size="tiny"``: 2 heads x 128, one or two blocks. Full sizes (``SIZES``): ``"full"`` for Flux.1
    and HunyuanVideo, ``"wan1.3b"`` / ``"wan14b"`` for Wan 2.1. The random state dict is made on
    ``device`` and ComfyUI's loader runs with ``device`` as the default device, so a full-size model
    is built and loaded on the GPU (no host copy, no fp32 copy). ``norm_scale``: value of the
    normalisation weights (default: random like the other 1-D tensors, which makes q/k tiny after
    the q/k norms and attention near-uniform; 1.0 is what a trained model starts from).
    """
    require_comfy()
    import comfy.ops
    import comfy.sd
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    from comfy.ldm.wan.model import WanModel

    if (kind, size) not in SIZES:
        raise ValueError(f"no size {size!r} for {kind!r}; known: {sorted(k for k in SIZES if k[0] == kind)}")
    shape = SIZES[kind, size]
    torch.manual_seed(seed)
    ops = comfy.ops.manual_cast
    with torch.device("meta" if size != "tiny" else "cpu"):
        if kind == "flux":
            net = Flux(image_model="flux", in_channels=16, out_channels=16, patch_size=2, axes_dim=[16, 56, 56],
                       mlp_ratio=4.0, theta=10000, qkv_bias=True, txt_ids_dims=[], guidance_embed=True,
                       operations=ops, **shape)
        elif kind == "wan":
            net = WanModel(in_dim=16, out_dim=16, text_len=512, operations=ops, **shape)
        else:
            net = HunyuanVideo(image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2],
                               axes_dim=[16, 56, 56], mlp_ratio=4.0, theta=256, qkv_bias=True, guidance_embed=True,
                               meanflow=False, byt5=False, use_cond_type_embedding=False, vision_in_dim=None,
                               meanflow_sum=False, operations=ops, **shape)
    state_dict = {}
    for name, tensor in net.state_dict().items():
        t = torch.empty(tensor.shape, dtype=dtype, device=device)
        if norm_scale is not None and _is_norm_scale(name, tensor):
            state_dict[name] = t.fill_(norm_scale)
        else:
            state_dict[name] = t.normal_(0.0, 0.02) if name.endswith("weight") and t.ndim > 1 else t.normal_(0.0, 0.01)
    del net
    with torch.device(device):
        return comfy.sd.load_diffusion_model_state_dict(state_dict, model_options={"dtype": dtype})


def conditioning(kind: str, text_tokens: int = 8, seed: int = 1, device="cpu", size: str = "tiny"):
    """Random positive/negative conditioning with the extras each model needs (dims as in ``SIZES``)."""
    g = torch.Generator().manual_seed(seed)
    shape = SIZES[kind, size]

    def cond():
        if kind == "wan":
            return [[torch.randn(1, text_tokens, 4096, generator=g), {}]]
        return [[torch.randn(1, text_tokens, shape["context_in_dim"], generator=g),
                 {"pooled_output": torch.randn(1, shape["vec_in_dim"], generator=g), "guidance": 3.5}]]

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
                # the frontend adds the control widget to INT inputs named seed / noise_seed even when the
                # spec does not ask for it (V1 nodes such as CogVideoXWrapper's sampler)
                default_control = spec[0] == "INT" and name in ("seed", "noise_seed")
                if (spec[1] if len(spec) > 1 else {}).get("control_after_generate", default_control):
                    values.pop(0)
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values left over")
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                source, index = sources[slot["link"]]
                inputs[slot["name"]] = [source, index]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# ---- kijai's ComfyUI-CogVideoXWrapper (COGVIDEOX_WRAPPER_PATH) ----

COGVIDEOX_WRAPPER_PATH = os.environ.get("COGVIDEOX_WRAPPER_PATH")
COGVIDEOX_TEXT_TOKENS = 226


def cogvideox_wrapper_path() -> str:
    """The wrapper checkout at ``COGVIDEOX_WRAPPER_PATH`` with ComfyUI (``COMFYUI_PATH``) and the wrapper's
    requirements (diffusers, accelerate, opencv) importable, or skip with the reason."""
    import importlib.util

    require_comfy()
    if not COGVIDEOX_WRAPPER_PATH:
        pytest.skip("COGVIDEOX_WRAPPER_PATH not set: point it to a checkout of kijai/ComfyUI-CogVideoXWrapper "
                    "to run the CogVideoX tests")
    path = os.path.abspath(COGVIDEOX_WRAPPER_PATH)
    if not os.path.isfile(os.path.join(path, "custom_cogvideox_transformer_3d.py")):
        pytest.skip(f"COGVIDEOX_WRAPPER_PATH={path} is not a ComfyUI-CogVideoXWrapper checkout")
    for requirement in ("diffusers", "accelerate", "cv2"):
        if importlib.util.find_spec(requirement) is None:
            pytest.skip(f"{requirement} (a requirement of the CogVideoX wrapper) is not installed: "
                        f"pip install -r {path}/requirements.txt")
    return path


def require_cogvideox_wrapper():
    """Import the wrapper (:func:`cogvideox_wrapper_path`) as ComfyUI's custom-node loader does: a package
    named after its folder, its ``__init__`` run. Skips with the reason when it cannot."""
    import importlib.util

    path = cogvideox_wrapper_path()
    name = os.path.basename(path)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                      submodule_search_locations=[path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def wrapper_module(wrapper, name: str):
    """A submodule of the imported wrapper package, e.g. ``"nodes"``, ``"pipeline_cogvideox"``."""
    import importlib

    return importlib.import_module(f"{wrapper.__name__}.{name}")


def build_cogvideox(wrapper, attention_mode: str = "sdpa", layers: int = 2, heads: int = 2, seed: int = 0,
                    dtype=torch.float32, device="cpu"):
    """A ``COGVIDEOMODEL`` as the wrapper's ``CogVideoXModelLoader`` returns it, around a random-weight
    transformer built by the wrapper's class from its CogVideoX-5B config with ``layers`` x ``heads`` x 64
    (text and time embeddings 32 wide), fused projections for the ``fused_*`` attention modes."""
    import json

    from diffusers.models.attention import Attention
    from diffusers.schedulers import CogVideoXDDIMScheduler

    root = os.path.dirname(wrapper.__file__)
    with open(os.path.join(root, "configs", "transformer_config_5b.json")) as f:
        config = json.load(f)
    with open(os.path.join(root, "configs", "scheduler_config_5b.json")) as f:
        scheduler_config = json.load(f)
    config.update(num_layers=layers, num_attention_heads=heads, text_embed_dim=32, time_embed_dim=32)
    torch.manual_seed(seed)
    cls = wrapper_module(wrapper, "custom_cogvideox_transformer_3d").CogVideoXTransformer3DModel
    with torch.device(device):
        transformer = cls.from_config(config, attention_mode=attention_mode).to(dtype).eval()
    if "fused" in attention_mode:
        transformer.fuse_qkv_projections = True
        for module in transformer.modules():
            if isinstance(module, Attention):
                module.fuse_projections(fuse=True)
    transformer.attention_mode = attention_mode
    pipe = wrapper_module(wrapper, "pipeline_cogvideox").CogVideoXPipeline(
        transformer, CogVideoXDDIMScheduler.from_config(scheduler_config), dtype=dtype)
    return {"pipe": pipe, "dtype": dtype, "quantization": "disabled", "base_path": "tiny-cogvideox",
            "onediff": False, "cpu_offloading": False, "scheduler_config": scheduler_config,
            "model_name": "tiny-cogvideox-5b", "manual_offloading": True}


def cogvideox_conditioning(seed: int = 1):
    """Random positive and negative text embeddings (1, 226, 32) for :func:`build_cogvideox`'s models."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, COGVIDEOX_TEXT_TOKENS, 32, generator=g) for _ in range(2)]


def sample_cogvideox(wrapper, model, steps: int = 2, frames: int = 9, height: int = 64, width: int = 96,
                     cfg: float = 6.0, seed: int = 0):
    """Sample with the wrapper's own "CogVideo Sampler" node (CogVideoXDDIM); returns the latent
    (1, T, 16, H/8, W/8). The defaults give a (3, 4, 6) token grid: 226 + 72 tokens per attention."""
    positive, negative = cogvideox_conditioning()
    sampler = wrapper_module(wrapper, "nodes").CogVideoSampler()
    empty = {"samples": torch.zeros(1, 4, height // 8, width // 8)}
    (out,) = sampler.process(model=model, positive=positive, negative=negative, steps=steps, cfg=cfg, seed=seed,
                             scheduler="CogVideoXDDIM", num_frames=frames, samples=empty)
    return out["samples"]
