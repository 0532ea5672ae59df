"""Per-layer x per-head sparsity as a picture (Pillow), for the "SpargeAttn Sparsity Map" node.

:func:`draw_heatmap` renders any (rows x columns) array of values in [0, 1] with row and column
labels, a title and a colour scale, so the same renderer serves the last run of a patched model
(:func:`run_matrix`) and, later, tuned parameter files. No ComfyUI import: tested in CI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .override import SpargeState
from .stats import RunStats
from .ui import run_payload

# Viridis, sampled at 0, 1/9, ..., 1: perceptually uniform, lightness rises monotonically, readable
# by people with the common colour-vision deficiencies, and legible in greyscale.
PALETTE = np.array([
    (68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
    (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)], dtype=np.float64)
NO_DATA = (190, 190, 190)
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
MUTED = (95, 95, 95)
TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)


def colour(value: float) -> tuple[int, int, int]:
    """Colour of ``value`` (clipped to [0, 1]); NaN gets the grey of "no data"."""
    if value is None or math.isnan(value):
        return NO_DATA
    x = min(max(float(value), 0.0), 1.0) * (len(PALETTE) - 1)
    i = min(int(x), len(PALETTE) - 2)
    rgb = PALETTE[i] + (PALETTE[i + 1] - PALETTE[i]) * (x - i)
    return tuple(int(round(c)) for c in rgb)


def _font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled scalable font (Pillow >= 10.1), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


@dataclass(frozen=True)
class HeatmapLayout:
    """Where :func:`draw_heatmap` put things (pixel boxes are (left, top, right, bottom))."""

    size: tuple[int, int]
    title: tuple[int, int, int, int]
    grid: tuple[int, int, int, int]
    cell: tuple[int, int]
    row_labels: tuple[int, int, int, int]
    col_labels: tuple[int, int, int, int]
    colour_bar: tuple[int, int, int, int]
    labelled_rows: tuple[int, ...]
    labelled_cols: tuple[int, ...]
    values_written: bool


def _every(count: int, pitch: int, needed: int) -> tuple[int, ...]:
    """Indices to label so that labels ``needed`` px tall/wide do not overlap at ``pitch`` px."""
    step = max(1, math.ceil(needed / max(pitch, 1)))
    return tuple(range(0, count, step))


def draw_heatmap(values, row_labels, col_labels=None, *, title: str, subtitle: str = "",
                 row_axis: str = "layer", col_axis: str = "head",
                 scale_label: str = "sparsity") -> tuple[Image.Image, HeatmapLayout]:
    """Render a (rows x columns) array of values in [0, 1] as a heatmap with a colour scale.

    Parameters
    ----------
    values : array-like, shape (rows, columns)
        NaN marks a missing value (drawn grey, with a "no data" key).
    row_labels : sequence of str
        One per row (layers, e.g. ``"double.3"``).
    col_labels : sequence of str, optional
        One per column; default ``0 .. columns-1`` (heads).
    title, subtitle : str
    row_axis, col_axis, scale_label : str
        Axis names and the name of the colour scale.

    Returns
    -------
    (PIL.Image.Image, HeatmapLayout)
        An RGB image and where its parts are.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 2 or 0 in data.shape:
        raise ValueError(f"the heatmap needs a non-empty (rows x columns) array, got shape {data.shape}")
    rows, cols = data.shape
    col_labels = [str(i) for i in range(cols)] if col_labels is None else [str(c) for c in col_labels]
    row_labels = [str(r) for r in row_labels]
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"{rows}x{cols} values need {rows} row labels and {cols} column labels, "
                         f"got {len(row_labels)} and {len(col_labels)}")

    f_title, f_text, f_small = _font(20), _font(14), _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def extent(text, font):
        box = probe.textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    line_h = extent("Ag0", f_text)[1] + 4
    cw = min(max(640 // cols, 14), 56)
    ch = min(max(560 // rows, 12), 30)
    values_written = cw >= 38 and ch >= 18
    pad = 16
    label_w = max(extent(t, f_text)[0] for t in row_labels + [row_axis]) + 10
    col_label_h = extent("0", f_small)[1] + 6

    title_h = extent(title, f_title)[1] + 8 + (line_h if subtitle else 0)
    grid_left = pad + label_w
    grid_top = pad + title_h + 10 + line_h + col_label_h
    grid_w, grid_h = cols * cw, rows * ch
    bar_h = max(grid_h, 160)
    bar_left = grid_left + grid_w + 28
    tick_w = max(extent(f"{t:.2f}", f_small)[0] for t in TICKS)
    width = max(bar_left + 26 + tick_w, bar_left + extent(scale_label, f_text)[0],
                pad + extent(title, f_title)[0], pad + extent(subtitle, f_text)[0]) + pad
    has_missing = bool(np.isnan(data).any())
    height = grid_top + max(grid_h, bar_h) + pad + (line_h + 6 if has_missing else 0)

    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)

    draw.text((pad, pad), title, fill=INK, font=f_title)
    if subtitle:
        draw.text((pad, pad + extent(title, f_title)[1] + 8), subtitle, fill=MUTED, font=f_text)
    title_box = (pad, pad, width - pad, pad + title_h)

    axis_y = pad + title_h + 10
    draw.text((pad, axis_y), row_axis, fill=MUTED, font=f_text)
    draw.text((grid_left, axis_y), col_axis, fill=MUTED, font=f_text)

    labelled_cols = _every(cols, cw, extent(col_labels[-1], f_small)[0] + 4)
    for j in labelled_cols:
        w, _ = extent(col_labels[j], f_small)
        draw.text((grid_left + j * cw + (cw - w) // 2, grid_top - col_label_h), col_labels[j], fill=INK, font=f_small)
    labelled_rows = _every(rows, ch, line_h - 2)
    for i in labelled_rows:
        _, h = extent(row_labels[i], f_text)
        draw.text((pad, grid_top + i * ch + (ch - h) // 2 - 2), row_labels[i], fill=INK, font=f_text)

    for i in range(rows):
        for j in range(cols):
            v = data[i, j]
            box = (grid_left + j * cw, grid_top + i * ch, grid_left + (j + 1) * cw - 1, grid_top + (i + 1) * ch - 1)
            fill = colour(v)
            draw.rectangle(box, fill=fill)
            if values_written and not math.isnan(v):
                text = f"{v:.2f}"
                w, h = extent(text, f_small)
                light = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2] > 140
                draw.text((box[0] + (cw - w) // 2, box[1] + (ch - h) // 2 - 2), text,
                          fill=INK if light else BACKGROUND, font=f_small)

    bar_top = grid_top
    draw.text((bar_left, axis_y), scale_label, fill=MUTED, font=f_text)
    for y in range(bar_h):
        draw.line([(bar_left, bar_top + y), (bar_left + 17, bar_top + y)], fill=colour(1.0 - y / (bar_h - 1)))
    draw.rectangle((bar_left - 1, bar_top - 1, bar_left + 18, bar_top + bar_h), outline=MUTED)
    for t in TICKS:
        y = bar_top + round((1.0 - t) * (bar_h - 1))
        draw.line([(bar_left + 18, y), (bar_left + 22, y)], fill=INK)
        _, h = extent(f"{t:.2f}", f_small)
        draw.text((bar_left + 26, y - h // 2 - 2), f"{t:.2f}", fill=INK, font=f_small)

    if has_missing:
        y = grid_top + max(grid_h, bar_h) + 8
        draw.rectangle((grid_left, y, grid_left + 14, y + 14), fill=NO_DATA)
        draw.text((grid_left + 20, y - 1), "no data", fill=INK, font=f_text)

    layout = HeatmapLayout(
        size=(width, height), title=title_box, grid=(grid_left, grid_top, grid_left + grid_w, grid_top + grid_h),
        cell=(cw, ch), row_labels=(pad, grid_top, grid_left, grid_top + grid_h),
        col_labels=(grid_left, grid_top - col_label_h, grid_left + grid_w, grid_top),
        colour_bar=(bar_left, bar_top, bar_left + 18, bar_top + bar_h),
        labelled_rows=labelled_rows, labelled_cols=labelled_cols, values_written=values_written)
    return image, layout


def run_matrix(run: RunStats) -> tuple[np.ndarray, list[str]]:
    """Per-layer x per-head sparsity (1 − fraction of Q·Kᵀ blocks computed) of a run.

    Each layer's per-head density is averaged over all of its sparse calls in the run. Layers are
    in the order they first ran; a layer with fewer heads than the widest gets NaN in the rest.
    Layers that never ran sparse are not in the statistics and so not in the matrix.

    Returns
    -------
    (numpy.ndarray of shape (layers, heads), list of layer names)
    """
    sums: dict[str, list] = {}
    for step in run.steps:
        for name, layer in step.layers.items():
            entry = sums.setdefault(name, [0, np.zeros(len(layer.density))])
            if len(entry[1]) != len(layer.density):
                raise ValueError(f"layer {name} reported {len(layer.density)} heads after {len(entry[1])}")
            entry[0] += layer.calls
            entry[1] += layer.calls * np.asarray(layer.density, dtype=np.float64)
    if not sums:
        return np.zeros((0, 0)), []
    heads = max(len(d) for _, d in sums.values())
    matrix = np.full((len(sums), heads), np.nan)
    for i, (n, d) in enumerate(sums.values()):
        matrix[i, :len(d)] = 1.0 - d / n
    return matrix, list(sums)


def draw_message(title: str, lines: list[str]) -> Image.Image:
    """A plain card with a title and a few lines (when there is nothing to plot, and why)."""
    f_title, f_text = _font(20), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = 32 + max(probe.textbbox((0, 0), t, font=f)[2] for t, f in [(title, f_title)] + [(t, f_text) for t in lines])
    image = Image.new("RGB", (max(width, 320), 72 + 24 * len(lines)), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((16, 16), title, fill=INK, font=f_title)
    for k, line in enumerate(lines):
        draw.text((16, 56 + 24 * k), line, fill=MUTED, font=f_text)
    return image


def sparsity_image(state: SpargeState) -> np.ndarray:
    """The picture for ``state``'s last finished run, as an (H, W, 3) uint8 array.

    Raises
    ------
    ValueError
        When the model has not finished a sampling run yet.
    """
    run = state.last_run
    if run is None or not run.steps:
        raise ValueError("SpargeAttn Sparsity Map: the patched model has not finished a sampling run yet. Run "
                         "the sampler first: connect the sampler's LATENT output to this node's 'samples' "
                         "input, so that it runs after sampling")
    node = f"node #{state.node_id}" if state.node_id is not None else "SpargeAttn Patch"
    line = run_payload(run, str(state.node_id))["line"].replace("×", "x")  # Pillow's bundled font has no ×
    matrix, layers = run_matrix(run)
    if not layers:
        image = draw_message(f"SpargeAttn ({node}): no sparse attention in the last run",
                             [line, "Every attention call stayed dense (why: in the line above), so there is no "
                                    "sparsity to map.", "Turn on 'verbose' on the patch node to log each reason once."])
    else:
        config = state.config
        setting = f"top-k {config.topk:g}" if config.mode == "topk" else f"cdf tau {config.cdf_threshold:g}"
        image, _ = draw_heatmap(matrix, layers, title=f"SpargeAttn sparsity per layer and head ({node}, {setting})",
                                subtitle=line, scale_label="sparsity (share of blocks skipped)")
    return np.asarray(image)
