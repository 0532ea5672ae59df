"""What an attention call looks like for each model: tensor layout, text tokens, latent grid.

ComfyUI hands every attention backend (and our override) q, k, v in one of two layouts:

* ``skip_reshape=True``: (B, H, N, D) — Flux, HunyuanVideo; passed to the kernel as "HND";
* ``skip_reshape=False``: (B, N, H·D) with ``heads`` = H — Wan; viewed as (B, N, H, D), "NHD".

The output must be (B, N, H·D), or (B, H, N, D) when ``skip_output_reshape=True``.

Token order inside joint (text + image) attention differs per model family:

========================  =====================================================================
family                    sequence
========================  =====================================================================
``video`` (Wan 2.1/2.2)   [reference tokens (``ref_conv``, optional)] [video grid]; text only in
                          cross-attention
``text_first`` (Flux,     [text] [reference latent (HunyuanVideo I2V)] [image grid]
HunyuanVideo >= v0.14)    [Kontext reference images (Flux)]
``image_first``           [reference latent] [image grid] [text]
(HunyuanVideo < v0.14)
========================  =====================================================================

HunyuanVideo switched from image-first to text-first in ComfyUI v0.14.0. The order is read from the
loaded model (its double blocks carry ``flipped_img_txt=True`` in the image-first code), never from
a version string. Token counts come from the tensors: the latent grid from the latent's shape and
the model's patch size, the text length as what is left of the sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

VIDEO, TEXT_FIRST, IMAGE_FIRST, UNKNOWN = "video", "text_first", "image_first", "unknown"


@dataclass(frozen=True)
class CallView:
    """q, k, v of one attention call in the layout the kernel takes, plus their sizes."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: str  # "HND" = (B, H, N, D) or "NHD" = (B, N, H, D)
    batch: int
    heads: int
    n_q: int
    n_k: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        """Index of the token axis in the kernel layout."""
        return 2 if self.layout == "HND" else 1


def view_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, skip_reshape: bool) -> CallView:
    """Describe a ComfyUI attention call without copying its tensors.

    Raises
    ------
    ValueError
        When the shapes do not match the layout ComfyUI promises (a model bug, not a user error).
    """
    if skip_reshape:
        if q.ndim != 4:
            raise ValueError(f"skip_reshape=True expects (B, H, N, D) tensors, got q of shape {tuple(q.shape)}")
        b, h, n_q, d = q.shape
        return CallView(q, k, v, "HND", b, h, n_q, k.shape[2], d)
    if q.ndim != 3 or q.shape[-1] % heads:
        raise ValueError(f"expected (B, N, heads*D) tensors with heads={heads}, got q of shape {tuple(q.shape)}")
    b, n_q, hd = q.shape
    d = hd // heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], -1, d)

    return CallView(split(q), split(k), split(v), "NHD", b, heads, n_q, k.shape[1], d)


def output_layout(out: torch.Tensor, view: CallView, skip_output_reshape: bool) -> torch.Tensor:
    """Turn the kernel output (in ``view.layout``) into what ComfyUI expects from a backend."""
    if skip_output_reshape:  # (B, H, N, D)
        return out if view.layout == "HND" else out.transpose(1, 2)
    if view.layout == "HND":
        out = out.transpose(1, 2)
    return out.reshape(view.batch, view.n_q, view.heads * view.head_dim)


def model_family(diffusion_model: torch.nn.Module) -> str:
    """The token-order family of a ComfyUI diffusion model (see the module docstring)."""
    names = {cls.__name__ for cls in type(diffusion_model).__mro__}
    if "WanModel" in names:
        return VIDEO
    if "HunyuanVideo" in names:
        blocks = getattr(diffusion_model, "double_blocks", None)
        flipped = bool(blocks) and getattr(blocks[0], "flipped_img_txt", False)
        return IMAGE_FIRST if flipped else TEXT_FIRST
    if "Flux" in names:
        return TEXT_FIRST
    return UNKNOWN


def latent_grid(latent_shape, patch_size) -> tuple[int, int, int]:
    """Token grid (T', H', W') of a latent after patching.

    Parameters
    ----------
    latent_shape : sequence of int
        (B, C, H, W) for images or (B, C, T, H, W) for video.
    patch_size : int or sequence of int
        The diffusion model's ``patch_size``: one int for (H, W) (Flux: 2), or one size per
        latent axis after the channels (Wan, HunyuanVideo: (1, 2, 2)). Partial patches are padded,
        so sizes round up.
    """
    spatial = tuple(int(s) for s in latent_shape[2:])
    if isinstance(patch_size, int):
        patch = (patch_size,) * len(spatial)
    else:
        patch = tuple(int(p) for p in patch_size)
    if len(spatial) not in (2, 3) or len(patch) != len(spatial):
        raise ValueError(f"latent of shape {tuple(latent_shape)} does not fit patch size {patch_size}")
    grid = tuple(-(-s // p) for s, p in zip(spatial, patch))
    return grid if len(grid) == 3 else (1, *grid)


@dataclass(frozen=True)
class TokenLayout:
    """Where the latent grid and the always-computed tokens sit in a sequence.

    Attributes
    ----------
    grid : (T', H', W') or None
        The latent grid, None when its position in the sequence is not known (no Hilbert order).
    grid_start : int
        Index of the grid's first token.
    keep_ranges : tuple of (start, end)
        Token ranges whose rows and columns are always computed (text, reference tokens).
    """

    grid: tuple[int, int, int] | None
    grid_start: int
    keep_ranges: tuple[tuple[int, int], ...]


def token_layout(family: str, n_tokens: int, grid, transformer_options: dict,
                 ref_tokens: int = 0, protect_text: bool = True) -> TokenLayout | str:
    """Locate text and image tokens in a self/joint-attention sequence.

    Parameters
    ----------
    family : str
        From :func:`model_family`.
    n_tokens : int
        Sequence length N of the call.
    grid : (T', H', W') or None
        The latent grid of this model evaluation (Wan's ``grid_sizes`` when given).
    transformer_options : dict
        The call's options: ``img_slice`` ([text_len, total], Flux/HunyuanVideo single blocks) and
        ``reference_image_num_tokens`` (Flux Kontext references after the grid) are used.
    ref_tokens : int
        Reference-latent tokens placed just before the grid (HunyuanVideo I2V ``ref_latent``).
    protect_text : bool
        Keep text (and reference) tokens out of sparsification.

    Returns
    -------
    TokenLayout, or str
        The layout, or the reason the call must stay dense because the text cannot be located.
    """
    if grid is None:
        if protect_text and family != VIDEO:
            return "latent grid unknown, text tokens cannot be located"
        return TokenLayout(None, 0, ())
    n_grid = math.prod(grid)
    extra = n_tokens - n_grid
    if extra < 0:
        return f"{n_tokens} tokens, fewer than the {n_grid}-token latent grid (text-only attention)"

    def keep(*ranges):
        return tuple(r for r in ranges if r[1] > r[0]) if protect_text else ()

    if family == VIDEO:
        return TokenLayout(grid, extra, keep((0, extra)))
    if family == TEXT_FIRST:
        img_slice = transformer_options.get("img_slice")
        if img_slice is not None and int(img_slice[1]) == n_tokens:
            n_text = int(img_slice[0])
        else:
            n_text = extra - ref_tokens - sum(transformer_options.get("reference_image_num_tokens") or ())
        if n_text < 0 or n_text + ref_tokens + n_grid > n_tokens:
            return f"token layout mismatch ({n_tokens} tokens, grid {n_grid}, {ref_tokens} reference)"
        return TokenLayout(grid, n_text + ref_tokens, keep((0, n_text + ref_tokens)))
    if family == IMAGE_FIRST:
        if extra < ref_tokens:
            return f"token layout mismatch ({n_tokens} tokens, grid {n_grid}, {ref_tokens} reference)"
        return TokenLayout(grid, ref_tokens, keep((0, ref_tokens), (ref_tokens + n_grid, n_tokens)))
    if extra == 0:
        return TokenLayout(grid, 0, ())
    if protect_text:
        return "text position unknown for this model (turn protect_text off to run it sparse)"
    return TokenLayout(None, 0, ())
