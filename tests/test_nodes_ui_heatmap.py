"""The sparsity heatmap (Pillow), without ComfyUI: run aggregation, colours, colour scale, labels, and
the picture the "SpargeAttn Sparsity Map" node returns for a patched model's state."""

import numpy as np
import pytest

from sparge_pack.nodes import heatmap as hm
from sparge_pack.nodes import override as ov
from sparge_pack.nodes.stats import LayerStats, RunStats, StepStats


def luminance(rgb):
    r, g, b = (float(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def ink_pixels(pixels, box):
    """Pixels in ``box`` that are clearly darker than the white background (text)."""
    left, top, right, bottom = box
    region = pixels[top:bottom, left:right].astype(int)
    return int((region.sum(axis=2) < 3 * 160).sum())


def test_colour_scale_is_monotone_in_lightness_with_fixed_ends():
    values = np.linspace(0, 1, 101)
    lights = [luminance(hm.colour(v)) for v in values]
    assert all(b > a for a, b in zip(lights, lights[1:]))
    assert hm.colour(0.0) == (68, 1, 84) and hm.colour(1.0) == (253, 231, 37)
    assert hm.colour(-3) == hm.colour(0.0) and hm.colour(7) == hm.colour(1.0)
    assert hm.colour(float("nan")) == hm.NO_DATA


def test_heatmap_cells_labels_and_colour_bar():
    rows, cols = 6, 4
    values = np.arange(rows * cols, dtype=float).reshape(rows, cols) / (rows * cols - 1)
    labels = [f"double.{i}" for i in range(rows)]
    image, layout = hm.draw_heatmap(values, labels, title="Sparsity", subtitle="4 steps")
    pixels = np.asarray(image)
    assert image.mode == "RGB" and image.size == layout.size and pixels.shape == (layout.size[1], layout.size[0], 3)
    assert 300 < image.size[0] < 2000 and 200 < image.size[1] < 2000
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank
    # every cell has its value's colour (probed at a corner, away from the printed number)
    cw, ch = layout.cell
    gx, gy = layout.grid[:2]
    for i in range(rows):
        for j in range(cols):
            assert tuple(pixels[gy + i * ch + 2, gx + j * cw + 2]) == hm.colour(values[i, j])
    # colour bar: lightness rises from bottom (0) to top (1), ends match the scale
    left, top, right, bottom = layout.colour_bar
    column = pixels[top:bottom, (left + right) // 2]
    lights = [luminance(p) for p in column[::-1]]
    assert all(b >= a for a, b in zip(lights, lights[1:])) and lights[-1] - lights[0] > 150
    assert tuple(column[0]) == hm.colour(1.0) and tuple(column[-1]) == hm.colour(0.0)
    # text: title, every row label, column labels, and the colour bar's tick labels
    assert ink_pixels(pixels, layout.title) > 100
    assert layout.labelled_rows == tuple(range(rows)) and layout.labelled_cols == tuple(range(cols))
    for i in range(rows):
        band = (layout.row_labels[0], gy + i * ch, layout.row_labels[2], gy + (i + 1) * ch)
        assert ink_pixels(pixels, band) > 20
    assert ink_pixels(pixels, layout.col_labels) > 4 * 5
    ticks = (right + 4, top - 10, image.size[0], bottom + 10)
    assert ink_pixels(pixels, ticks) > 5 * 20


def test_labels_come_from_the_given_text():
    values = np.full((3, 2), 0.5)
    a, la = hm.draw_heatmap(values, ["double.0", "double.1", "double.2"], title="t")
    b, lb = hm.draw_heatmap(values, ["single.7", "single.8", "single.9"], title="t")
    crop = lambda im, box: np.asarray(im)[box[1]:box[3], box[0]:box[2]]  # noqa: E731
    labels = (la.row_labels[0], la.row_labels[1], min(la.row_labels[2], lb.row_labels[2]), la.row_labels[3])
    assert (crop(a, labels) != crop(b, labels)).any()
    assert (crop(a, la.grid) == crop(b, lb.grid)).all()


def test_large_maps_thin_out_labels_and_missing_values_get_a_key():
    values = np.random.default_rng(0).random((57, 24))
    values[3, 20:] = np.nan
    image, layout = hm.draw_heatmap(values, [f"single.{i}" for i in range(57)], title="Flux")
    assert image.size[0] < 1100 and image.size[1] < 1100
    assert 0 < len(layout.labelled_rows) < 57 and not layout.values_written
    pixels = np.asarray(image)
    cw, ch = layout.cell
    assert tuple(pixels[layout.grid[1] + 3 * ch + 1, layout.grid[0] + 21 * cw + 1]) == hm.NO_DATA
    key = (layout.grid[0], layout.grid[3], layout.grid[2], image.size[1])
    assert ink_pixels(pixels, key) > 50  # the "no data" key under the grid


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match="non-empty"):
        hm.draw_heatmap(np.zeros((0, 3)), [], title="t")
    with pytest.raises(ValueError, match="2 row labels"):
        hm.draw_heatmap(np.zeros((2, 3)), ["a"], title="t")


def step(index, layers, dense=None):
    return StepStats(index, 0.5, sum(layer.calls for layer in layers.values()), dense or {}, layers)


def test_run_matrix_weights_calls_over_steps_and_keeps_layer_order():
    run = RunStats([
        step(0, {"double.1": LayerStats(1, [0.2, 0.4], [0, 0]), "double.0": LayerStats(2, [1.0, 0.5], [0, 0])}),
        step(1, {"double.1": LayerStats(3, [0.6, 0.4], [0, 0]), "single.0": LayerStats(1, [0.5], [0])}),
    ])
    matrix, names = hm.run_matrix(run)
    assert names == ["double.1", "double.0", "single.0"]
    assert matrix.shape == (3, 2)
    assert matrix[0] == pytest.approx([1 - (0.2 + 3 * 0.6) / 4, 0.6])
    assert matrix[1] == pytest.approx([0.0, 0.5])
    assert matrix[2, 0] == pytest.approx(0.5) and np.isnan(matrix[2, 1])
    assert hm.run_matrix(RunStats([step(0, {}, {ov.CROSS: 2})]))[1] == []


def test_sparsity_image_of_a_state():
    state = ov.SpargeState(ov.SpargeConfig(topk=0.3), node_id="9")
    with pytest.raises(ValueError, match="Run the sampler first"):
        hm.sparsity_image(state)
    state.last_run = RunStats([step(0, {"block.0": LayerStats(1, [0.3, 0.3], [0, 0])}, {ov.CROSS: 1})])
    pixels = hm.sparsity_image(state)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert (pixels == hm.colour(0.7)).all(axis=2).sum() > 500  # the two cells
    state.last_run = RunStats([step(0, {}, {ov.NOT_CUDA: 4})])
    card = hm.sparsity_image(state)  # all dense: a card saying why, not an empty map
    assert card.shape[1] > 300 and not (card == hm.colour(0.0)).all(axis=2).any()
