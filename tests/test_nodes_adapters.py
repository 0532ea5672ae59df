"""Model adapters: tensor layouts, latent grids, model families and token layouts."""

import pytest
import torch

from sparge_pack.nodes import adapters as ad


@pytest.mark.parametrize("skip_reshape,skip_output_reshape", [(False, False), (True, False), (True, True),
                                                              (False, True)])
def test_view_and_output_layout_round_trip(skip_reshape, skip_output_reshape):
    b, h, n, d = 2, 3, 5, 4
    hnd = torch.randn(b, h, n, d)
    x = hnd if skip_reshape else hnd.transpose(1, 2).reshape(b, n, h * d)
    view = ad.view_call(x, x, x, h, skip_reshape)
    assert (view.layout, view.batch, view.heads, view.n_q, view.head_dim) == (
        "HND" if skip_reshape else "NHD", b, h, n, d)
    kernel_out = view.q  # an identity "kernel" returns q in the kernel layout
    out = ad.output_layout(kernel_out, view, skip_output_reshape)
    expected = hnd if skip_output_reshape else hnd.transpose(1, 2).reshape(b, n, h * d)
    assert torch.equal(out, expected)


def test_view_rejects_shapes_that_do_not_match_heads():
    with pytest.raises(ValueError, match="heads=3"):
        ad.view_call(torch.randn(1, 5, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 8), 3, False)


@pytest.mark.parametrize("shape,patch,grid", [
    ((1, 16, 128, 128), 2, (1, 64, 64)),            # Flux 1024²
    ((1, 16, 127, 129), 2, (1, 64, 65)),            # odd sizes are padded up
    ((1, 16, 21, 60, 104), (1, 2, 2), (21, 30, 52)),  # Wan 2.1 480p x 81 frames
    ((1, 16, 33, 90, 160), [1, 2, 2], (33, 45, 80)),  # HunyuanVideo 720p x 129 frames
    ((1, 64, 90, 160), (2, 2), (1, 45, 80)),        # 2-D patch (HunyuanImage)
])
def test_latent_grid(shape, patch, grid):
    assert ad.latent_grid(shape, patch) == grid


def test_latent_grid_rejects_mismatched_patch():
    with pytest.raises(ValueError, match="patch size"):
        ad.latent_grid((1, 16, 4, 8, 8), (2, 2))


def test_model_family_by_class_and_by_hunyuan_block_order():
    class WanModel(torch.nn.Module):
        pass

    class VaceWanModel(WanModel):
        pass

    class Flux(torch.nn.Module):
        pass

    class HunyuanVideo(torch.nn.Module):
        def __init__(self, flipped):
            super().__init__()
            block = torch.nn.Module()
            if flipped is not None:
                block.flipped_img_txt = flipped
            self.double_blocks = torch.nn.ModuleList([block])

    assert ad.model_family(VaceWanModel()) == ad.VIDEO
    assert ad.model_family(Flux()) == ad.TEXT_FIRST
    assert ad.model_family(HunyuanVideo(None)) == ad.TEXT_FIRST   # ComfyUI >= 0.14: attribute gone
    assert ad.model_family(HunyuanVideo(True)) == ad.IMAGE_FIRST  # ComfyUI < 0.14
    assert ad.model_family(torch.nn.Linear(2, 2)) == ad.UNKNOWN


def test_token_layouts_per_family():
    grid = (2, 3, 4)  # 24 tokens
    assert ad.token_layout(ad.VIDEO, 24, grid, {}) == ad.TokenLayout(grid, 0, ())
    assert ad.token_layout(ad.VIDEO, 30, grid, {}) == ad.TokenLayout(grid, 6, ((0, 6),))  # Wan ref_conv tokens
    assert ad.token_layout(ad.TEXT_FIRST, 34, grid, {}) == ad.TokenLayout(grid, 10, ((0, 10),))
    # Flux Kontext: reference images follow the grid and are not text.
    assert ad.token_layout(ad.TEXT_FIRST, 40, grid, {"reference_image_num_tokens": [6]}) == \
        ad.TokenLayout(grid, 10, ((0, 10),))
    # Single blocks report the text length directly.
    assert ad.token_layout(ad.TEXT_FIRST, 40, grid, {"img_slice": [12, 40]}) == ad.TokenLayout(grid, 12, ((0, 12),))
    # HunyuanVideo I2V reference latent sits between text and grid.
    assert ad.token_layout(ad.TEXT_FIRST, 40, grid, {}, ref_tokens=6) == ad.TokenLayout(grid, 16, ((0, 16),))
    assert ad.token_layout(ad.IMAGE_FIRST, 34, grid, {}) == ad.TokenLayout(grid, 0, ((24, 34),))
    assert ad.token_layout(ad.IMAGE_FIRST, 40, grid, {}, ref_tokens=6) == \
        ad.TokenLayout(grid, 6, ((0, 6), (30, 40)))
    assert ad.token_layout(ad.TEXT_FIRST, 34, grid, {}, protect_text=False) == ad.TokenLayout(grid, 10, ())
    assert ad.token_layout(ad.UNKNOWN, 24, grid, {}) == ad.TokenLayout(grid, 0, ())


def test_token_layout_reasons():
    grid = (2, 3, 4)
    assert "text-only" in ad.token_layout(ad.TEXT_FIRST, 10, grid, {})   # HunyuanVideo token refiner
    assert "mismatch" in ad.token_layout(ad.TEXT_FIRST, 26, grid, {"reference_image_num_tokens": [6]})
    assert "protect_text off" in ad.token_layout(ad.UNKNOWN, 30, grid, {})
    assert ad.token_layout(ad.UNKNOWN, 30, grid, {}, protect_text=False) == ad.TokenLayout(None, 0, ())
    assert "grid unknown" in ad.token_layout(ad.TEXT_FIRST, 30, None, {})
    assert ad.token_layout(ad.VIDEO, 30, None, {}) == ad.TokenLayout(None, 0, ())
