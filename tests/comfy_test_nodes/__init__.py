"""A test-only ComfyUI node for the browser test (tests/test_comfy_browser.py), loaded from a temporary
custom_nodes folder of the test's server, never by users: random text conditioning for a tiny Wan model,
which has no text encoder small enough to ship."""

import torch


class SpargeAttnTestConditioning:
    """Positive and negative random conditioning of shape (1, tokens, 4096) (the Wan text width)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": ("INT", {"default": 8, "min": 1, "max": 512})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, tokens):
        g = torch.Generator().manual_seed(tokens)
        return ([[torch.randn(1, tokens, 4096, generator=g), {}]],
                [[torch.randn(1, tokens, 4096, generator=g), {}]])


NODE_CLASS_MAPPINGS = {"SpargeAttnTestConditioning": SpargeAttnTestConditioning}
