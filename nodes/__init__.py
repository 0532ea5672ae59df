"""ComfyUI glue of the pack: the node schema, the attention override, model adapters, statistics.

``override``, ``adapters``, ``hilbert`` and ``stats`` import torch only (tests use them without
ComfyUI); ``patch`` and ``entry`` import ComfyUI and are loaded by ComfyUI's node loader.
"""
