"""The pack's V3 extension: the list of nodes ComfyUI registers."""

from comfy_api.latest import ComfyExtension, io

from .cogvideox_node import SpargeAttnCogVideoX
from .patch import SpargeAttnPatch
from .sparsity_map import SpargeAttnSparsityMap
from .tune_nodes import SpargeAttnSaveTuned, SpargeAttnTune


class SpargeAttnExtension(ComfyExtension):
    """Nodes of the SpargeAttn pack."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SpargeAttnPatch, SpargeAttnSparsityMap, SpargeAttnCogVideoX, SpargeAttnTune, SpargeAttnSaveTuned]


async def get_extension() -> SpargeAttnExtension:
    """Called by the pack's ``comfy_entrypoint``."""
    return SpargeAttnExtension()
