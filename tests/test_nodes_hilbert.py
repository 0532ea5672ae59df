"""Generalized 3-D Hilbert order: bijection, locality, sequence permutation round trip."""

import itertools

import pytest
import torch

from sparge_pack.nodes.hilbert import hilbert_cells, sequence_permutation


def _steps(cells):
    return [sum(abs(a - b) for a, b in zip(p, q)) for p, q in zip(cells, cells[1:])]


@pytest.mark.parametrize("t", range(1, 7))
def test_every_small_grid_is_a_bijection_with_short_steps(t):
    for h, w in itertools.product(range(1, 9), range(1, 9)):
        cells = hilbert_cells(t, h, w)
        assert sorted(cells) == list(itertools.product(range(t), range(h), range(w)))
        steps = _steps(cells)
        # Steps longer than one cell are rare exceptions forced by odd sizes, and stay short.
        assert sum(s != 1 for s in steps) <= max(1, len(steps) // 8), (t, h, w)
        assert max(steps, default=1) <= 4, (t, h, w)


@pytest.mark.parametrize("grid", [(1, 64, 64), (21, 30, 52), (13, 30, 45), (1, 1, 300), (5, 1, 7)])
def test_real_grids(grid):
    cells = hilbert_cells(*grid)
    assert len(cells) == len(set(cells)) == grid[0] * grid[1] * grid[2]
    steps = _steps(cells)
    assert max(steps, default=1) <= 2
    assert sum(s != 1 for s in steps) <= 0.01 * len(steps)
    if grid == (1, 64, 64):  # a power-of-two square is a true Hilbert curve: unit steps only
        assert set(steps) == {1}


def _block_extent(order_cells, block):
    """Mean summed side length (t + h + w) of the bounding boxes of consecutive token blocks."""
    cells = torch.tensor(order_cells)
    n = len(order_cells) // block * block
    chunks = cells[:n].view(-1, block, 3)
    return (chunks.amax(1) - chunks.amin(1) + 1).sum(1).float().mean().item()


@pytest.mark.parametrize("grid,block", [((21, 30, 52), 64), ((21, 30, 52), 128), ((1, 64, 64), 64)])
def test_blocks_are_more_compact_than_row_major(grid, block):
    t, h, w = grid
    row_major = list(itertools.product(range(t), range(h), range(w)))
    hil = hilbert_cells(t, h, w)
    # Row-major blocks are thin strips (1 x 2 x 52: 55); Hilbert blocks are compact boxes (~4 x 4 x 4).
    assert _block_extent(hil, block) < 0.5 * _block_extent(row_major, block)


def test_sequence_permutation_round_trip_keeps_text_in_place():
    grid, start, n = (3, 5, 6), 7, 7 + 90 + 4
    perm, inv = sequence_permutation(grid, start, n, torch.device("cpu"))
    assert sorted(perm.tolist()) == list(range(n))
    assert perm[:start].tolist() == list(range(start))
    assert perm[start + 90:].tolist() == list(range(start + 90, n))
    x = torch.randn(2, n, 3, 4)
    y = x.index_select(1, perm)
    assert torch.equal(y.index_select(1, inv), x)
    # The permuted grid segment follows the curve: token j is cell hilbert_cells[j] in row-major.
    t, h, w = hilbert_cells(*grid)[1]
    assert perm[start + 1].item() == start + t * 30 + h * 6 + w


def test_sequence_permutation_is_cached_per_grid_and_device():
    a = sequence_permutation((2, 3, 4), 0, 24, torch.device("cpu"))
    assert sequence_permutation((2, 3, 4), 0, 24, torch.device("cpu")) is a
    assert sequence_permutation((2, 4, 3), 0, 24, torch.device("cpu")) is not a


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match=">= 1"):
        hilbert_cells(0, 4, 4)
    with pytest.raises(ValueError, match="does not fit"):
        sequence_permutation((2, 2, 2), 5, 10, torch.device("cpu"))
