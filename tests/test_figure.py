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


def test_background_is_the_commonest_instance_on_the_border_not_the_sky():
    import torch

    from trace3d_ns.figure import background_instance

    ids = torch.zeros(10, 12, dtype=torch.long)  # sky (no instance) along the top and most of the sides
    ids[6:] = 3  # the ground
    ids[7:9, 4:7] = 5  # an object on it, away from the border
    ids[9, 0] = 5
    assert background_instance(ids) == 3
    assert background_instance(torch.zeros(4, 4, dtype=torch.long)) == 0
