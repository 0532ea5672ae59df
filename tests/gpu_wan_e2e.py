"""End-to-end check on a CUDA GPU: full-size random-weight Wan 2.1-1.3B, 480p x 81 frames, through ComfyUI.

Run from the pack root with a ComfyUI checkout::

    COMFYUI_PATH=/path/to/ComfyUI python tests/gpu_wan_e2e.py [--steps 4]

Builds Wan 2.1-1.3B (dim 1536, 12 heads x 128, 30 layers, ffn 8960, in_dim 16, text_len 512) with
random bf16 weights through ``comfy.sd.load_diffusion_model_state_dict``, samples the same noise
unpatched, patched at full density (top-k 1.0: only quantization differs) and patched at top-k 0.5,
and prints per-step seconds plus relL1 / cosine of each latent against the unpatched one, and the
patch's own statistics. Not collected by pytest (no test functions).
"""

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import conftest  # noqa: E402,F401  (loads the pack as ``sparge_pack``)
from comfy_support import build_model, conditioning  # noqa: E402


def run(model, latent, steps, seed=0):
    """Sample with euler/simple, cfg 1 (one model evaluation per step); returns (latent, seconds per step)."""
    import comfy.sample

    positive, negative = conditioning("wan", text_tokens=512)
    noise = comfy.sample.prepare_noise(latent, seed)
    marks = []

    def callback(step, x0, x, total):
        torch.cuda.synchronize()
        marks.append(time.perf_counter())

    torch.cuda.synchronize()
    start = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, negative, latent,
                              callback=callback, disable_pbar=True, seed=seed)
    times = [b - a for a, b in zip([start] + marks[:-1], marks)]
    return out.float(), times


def compare(out, ref):
    rel_l1 = ((out - ref).abs().sum() / ref.abs().sum()).item()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    return rel_l1, cos


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--frames", type=int, default=81)
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from sparge_pack.nodes.patch import apply_sparge

    t0 = time.perf_counter()
    model = build_model("wan", size="wan1.3b", dtype=torch.bfloat16)
    print(f"built Wan 2.1-1.3B (random bf16) through ComfyUI in {time.perf_counter() - t0:.1f} s; "
          f"{torch.cuda.get_device_name()}")
    latent = torch.zeros(1, 16, (args.frames - 1) // 4 + 1, 480 // 8, 832 // 8)  # 21 x 60 x 104 -> 32 760 tokens
    common = dict(start_percent=0.0, end_percent=1.0, dense_blocks="", min_tokens=0, mode="topk")
    configs = [("unpatched", None), ("topk 1.0", dict(topk=1.0)), ("topk 0.5", dict(topk=0.5)),
               ("topk 0.5 hilbert", dict(topk=0.5, token_order="hilbert"))]
    results = {}
    for name, options in configs:
        patched, state = (model, None) if options is None else apply_sparge(model, **common, **options)
        run(patched, latent, 1)  # warm-up: loading, Triton compilation, autotuning
        out, times = run(patched, latent, args.steps)
        results[name] = out
        line = f"{name:>18}: per step " + " ".join(f"{t:.3f}" for t in times) + \
            f" s (mean of steps 2+: {sum(times[1:]) / max(1, len(times) - 1):.3f} s)"
        if options is not None:
            rel_l1, cos = compare(out, results["unpatched"])
            totals = state.last_run.totals()
            line += (f"; vs unpatched relL1 {rel_l1:.4f}, cosine {cos:.6f}; density {totals['density']:.3f}, "
                     f"P·V skipped {totals['pv_skipped']:.3f}, sparse calls {totals['sparse_calls']}, "
                     f"dense {totals['dense_calls']}")
        print(line, flush=True)
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
