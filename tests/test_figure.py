"""The demo's overview grid."""

import numpy as np

from trace3d_ns.figure import compose


def test_compose_tiles_rows_under_column_titles():
    red = np.zeros((20, 30, 3), np.float32)
    red[..., 0] = 1.0
    blue = np.zeros((20, 20, 3), np.uint8)
    blue[..., 2] = 255
    grid = compose([[red, blue], [red, blue]], ["a", "b"], size=40, pad=4)
    header = 18
    assert grid.dtype == np.uint8 and grid.shape == (header + 2 * (40 + 4), 60 + 40 + 3 * 4, 3)
    # second row, first column: the red image scaled to 40 px high (60 wide); then the blue one
    assert tuple(grid[header + 44 + 20, 4 + 30]) == (255, 0, 0)
    assert tuple(grid[header + 44 + 20, 4 + 60 + 4 + 20]) == (0, 0, 255)
    assert (grid[: header - 4, 40:] != 255).any()  # titles drawn in the header
