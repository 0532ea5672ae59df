"""Generalized 3-D Hilbert order for latent grids of any size (T, H, W).

SpargeAttn's paper (§3.7) reorders video tokens along a 3-D Hilbert curve before attention so that
the 128-query / 64-key blocks the kernel works on are compact 3-D boxes instead of thin row-major
strips; compact blocks are more self-similar, so block prediction keeps fewer blocks for the same
error. Real latent grids are not powers of two (Wan 480p is 21 x 30 x 52), so this module builds a
*generalized* Hilbert curve by recursive splitting of an arbitrary box (the idea of the "gilbert"
family of curves): every box is walked from one corner towards the adjacent one along its longest
axis, and split into halves, or into 3 or 5 parts, whose walks join end to start. The parts always
tile the box exactly, so the order is a bijection for every size. Almost every step moves by one
cell along one axis; odd sizes add a few longer steps (76 of 32 759 steps on 21 x 30 x 52, none on
1 x 64 x 64, which is a true Hilbert curve).

The curve is computed once per grid on the CPU (pure Python, ~0.3 s for 118 800 cells) and the
index tensors are cached per (grid, device).
"""

from __future__ import annotations

from functools import lru_cache

import torch


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def _walk(origin, a, b, c, out):
    """Append to ``out`` the cells of the box spanned by vectors a (major), b, c from ``origin``.

    The walk starts at ``origin`` and ends at a cell next to ``origin + a - unit(a)`` (the far end
    of the major axis), so that callers can chain boxes. Vectors are axis-aligned 3-tuples; their
    signs give the walking direction along each axis.
    """
    # An explicit stack keeps deep grids (e.g. 1 x 1 x 4096) away from Python's recursion limit.
    stack = [(origin, a, b, c)]
    while stack:
        (x, y, z), a, b, c = stack.pop()
        w, h, d = (abs(sum(v)) for v in (a, b, c))
        if not (w and h and d):  # an empty part of a split (a half of a 1-cell axis)
            continue
        da, db, dc = (tuple(_sign(t) for t in v) for v in (a, b, c))

        # Degenerate boxes are straight lines along the only non-unit axis.
        if h == 1 and d == 1:
            out.extend((x + da[0] * i, y + da[1] * i, z + da[2] * i) for i in range(w))
            continue
        if w == 1 and d == 1:
            out.extend((x + db[0] * i, y + db[1] * i, z + db[2] * i) for i in range(h))
            continue
        if w == 1 and h == 1:
            out.extend((x + dc[0] * i, y + dc[1] * i, z + dc[2] * i) for i in range(d))
            continue

        a2, b2, c2 = ([t // 2 for t in v] for v in (a, b, c))
        # Halves of even length keep the sub-walks' corners adjacent; nudge odd halves by one cell.
        if abs(sum(a2)) % 2 and w > 2:
            a2 = [t + u for t, u in zip(a2, da)]
        if abs(sum(b2)) % 2 and h > 2:
            b2 = [t + u for t, u in zip(b2, db)]
        if abs(sum(c2)) % 2 and d > 2:
            c2 = [t + u for t, u in zip(c2, dc)]

        def add(p, *vs):
            return tuple(p[i] + sum(v[i] for v in vs) for i in range(3))

        def neg(v):
            return tuple(-t for t in v)

        def sub(u, v):
            return tuple(s - t for s, t in zip(u, v))

        p = (x, y, z)
        a_rest, b_rest, c_rest = sub(a, a2), sub(b, b2), sub(c, c2)
        a_back, b2_back, c_back = sub(a, da), sub(b2, db), sub(c, dc)
        if 2 * w > 3 * h and 2 * w > 3 * d:
            # Long box: two halves along the major axis.
            parts = [(p, a2, b, c), (add(p, a2), a_rest, b, c)]
        elif 3 * h > 4 * d:
            # Flat in d: a U-turn in the (a, b) plane, keeping c whole.
            parts = [
                (p, b2, c, a2),
                (add(p, b2), a, b_rest, c),
                (add(p, a_back, b2_back), neg(b2), c, neg(a_rest)),
            ]
        elif 3 * d > 4 * h:
            # Flat in h: a U-turn in the (a, c) plane, keeping b whole.
            c2_back = sub(c2, dc)
            parts = [
                (p, c2, a2, b),
                (add(p, c2), a, b, c_rest),
                (add(p, a_back, c2_back), neg(c2), neg(a_rest), b),
            ]
        else:
            # Cube-like: five parts that visit all eight octants.
            parts = [
                (p, b2, c2, a2),
                (add(p, b2), c, a2, b_rest),
                (add(p, b2_back, c_back), a, neg(b2), neg(c_rest)),
                (add(p, a_back, b2, c_back), neg(c), neg(a_rest), b_rest),
                (add(p, a_back, b2_back), neg(b2), c2, neg(a_rest)),
            ]
        # The stack is LIFO: push in reverse so the parts are walked in order.
        stack.extend(reversed(parts))


def hilbert_cells(t: int, h: int, w: int) -> list[tuple[int, int, int]]:
    """The (t, h, w) cells of a T x H x W grid in generalized-Hilbert order.

    Parameters
    ----------
    t, h, w : int
        Grid size along time, height and width; each must be >= 1.

    Returns
    -------
    list of (t, h, w) tuples
        Every cell exactly once; consecutive cells are neighbours except for a few short jumps
        where odd sizes force them.
    """
    if min(t, h, w) < 1:
        raise ValueError(f"grid sizes must be >= 1, got {(t, h, w)}")
    cells: list[tuple[int, int, int]] = []
    # Walk along the longest axis first; coordinates are (w, h, t) = (x, y, z).
    if w >= h and w >= t:
        _walk((0, 0, 0), (w, 0, 0), (0, h, 0), (0, 0, t), cells)
    elif h >= w and h >= t:
        _walk((0, 0, 0), (0, h, 0), (w, 0, 0), (0, 0, t), cells)
    else:
        _walk((0, 0, 0), (0, 0, t), (w, 0, 0), (0, h, 0), cells)
    return [(z, y, x) for x, y, z in cells]


@lru_cache(maxsize=16)
def _grid_order_cpu(t: int, h: int, w: int) -> torch.Tensor:
    cells = torch.tensor(hilbert_cells(t, h, w), dtype=torch.long)
    return cells[:, 0] * (h * w) + cells[:, 1] * w + cells[:, 2]


@lru_cache(maxsize=16)
def sequence_permutation(
    grid: tuple[int, int, int], grid_start: int, n_tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation of a whole token sequence that puts the grid segment in Hilbert order.

    Tokens outside ``[grid_start, grid_start + T*H*W)`` (text, reference images) keep their
    positions, so token ranges computed for the row-major sequence stay valid.

    Parameters
    ----------
    grid : (T, H, W)
        Latent grid after patching; its tokens are stored row-major (t, then h, then w).
    grid_start : int
        Sequence index of the grid's first token.
    n_tokens : int
        Sequence length N.
    device : torch.device
        Where the index tensors live (cached per device).

    Returns
    -------
    (perm, inverse) : two int64 tensors of length N
        ``x.index_select(dim, perm)`` reorders a sequence; ``y.index_select(dim, inverse)`` undoes
        it.
    """
    t, h, w = grid
    n_grid = t * h * w
    if grid_start < 0 or grid_start + n_grid > n_tokens:
        raise ValueError(f"grid {grid} at {grid_start} does not fit in {n_tokens} tokens")
    perm = torch.arange(n_tokens, dtype=torch.long)
    perm[grid_start : grid_start + n_grid] = _grid_order_cpu(t, h, w) + grid_start
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n_tokens, dtype=torch.long)
    return perm.to(device), inverse.to(device)
