"""ComfyUI glue of the pack: node schemas, the attention override, model adapters, statistics.

Pure modules (torch only; tests use them without ComfyUI): ``override``, ``adapters``, ``hilbert``,
``stats``, ``ui``, ``heatmap``, ``tune``, ``presets``, ``cogvideox``. Modules that import ComfyUI and
are loaded by its node loader: ``patch``, ``entry``, ``sparsity_map``, ``tune_nodes``,
``tuned_folder``, ``cogvideox_node``.
"""
