"""The pack's V3 extension: the list of nodes ComfyUI registers."""

from comfy_api.latest import ComfyExtension, io

from .patch import SpargeAttnPatch


class SpargeAttnExtension(ComfyExtension):
    """Nodes of the SpargeAttn pack."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SpargeAttnPatch]


async def get_extension() -> SpargeAttnExtension:
    """Called by the pack's ``comfy_entrypoint``."""
    return SpargeAttnExtension()
