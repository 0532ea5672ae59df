"""SpargeAttn for ComfyUI: sparse + quantized attention for Flux, Wan, HunyuanVideo and CogVideoX.

ComfyUI loads this file as the custom-node package. Nothing heavy is imported here: the kernels
(torch + triton) and the node glue are imported only when ComfyUI asks for the node list, so the
pack loads even on a machine without Triton or a CUDA GPU.
"""

WEB_DIRECTORY = "./web"

__version__ = "0.1.0"


async def comfy_entrypoint():
    """V3 entry point: ComfyUI calls this to get the pack's extension object."""
    from .nodes.entry import get_extension

    return await get_extension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint", "__version__"]
