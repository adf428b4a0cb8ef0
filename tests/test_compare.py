"""Image matching: a reference turned and shifted is found back, in its pose and with score 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_class2d.compare import match_images
from napari_class2d.sim.phantom import default_phantom
from napari_class2d.sim.threads import torch_threads
from napari_class2d.sim.transforms import euler_to_matrix, rotate_and_shift

APIX, BOX, DIAMETER = 3.5, 64, 180.0


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def views() -> torch.Tensor:
    """Four distinct projections of the built-in phantom (particle 160 Å across)."""
    A = euler_to_matrix([0, 40, 90, 150], [0, 60, 90, 120], [0, 0, 0, 0])
    return default_phantom().project(A, BOX, APIX, radius_A=80.0)


def _angle_error(a, b) -> torch.Tensor:
    return ((a - b + 180.0) % 360.0 - 180.0).abs()


def test_turned_and_shifted_reference_is_found_in_its_pose(views):
    psi = torch.tensor([17.0, 101.5, 233.0, 318.0])
    shift_A = torch.tensor([[7.0, -3.5], [0.0, 0.0], [-12.0, 9.0], [4.0, 14.0]])
    noise = (
        0.05 * views.std() * torch.randn((4, BOX, BOX), generator=torch.Generator().manual_seed(1))
    )
    images = rotate_and_shift(views, psi, shift_A, APIX) + noise
    m = match_images(images, views, APIX, mask_diameter_A=DIAMETER, band_A=(100.0, 10.0))
    assert m.score.shape == m.psi_deg.shape == (4, 4) and m.shift_A.shape == (4, 4, 2)
    # each image is matched best by its own view, nearly perfectly
    assert torch.equal(m.score.argmax(dim=1), torch.arange(4))
    assert (m.score.diagonal() > 0.95).all()
    off = m.score[~torch.eye(4, dtype=torch.bool)]
    assert off.max() < m.score.diagonal().min() - 0.05
    # ... in the pose it was put in: within a degree and half a pixel
    assert (_angle_error(m.psi_deg.diagonal(), psi) < 1.0).all(), m.psi_deg.diagonal()
    err = (m.shift_A.diagonal(dim1=0, dim2=1).T - shift_A).norm(dim=1)
    assert (err < 0.5 * APIX).all(), err
    # and the pose puts the reference on the image (the convention of rotate_and_shift)
    posed = rotate_and_shift(
        views, m.psi_deg.diagonal(), m.shift_A.diagonal(dim1=0, dim2=1).T, APIX
    )
    resid = (posed - images).flatten(1).norm(dim=1) / images.flatten(1).norm(dim=1)
    assert (resid < 0.15).all(), resid


def test_scores_are_symmetric_bounded_and_zero_for_blank(views):
    blank = torch.zeros((1, BOX, BOX))
    m = match_images(torch.cat((views, blank)), views, APIX, mask_diameter_A=DIAMETER)
    assert (m.score <= 1.0).all() and (m.score >= -1.0).all()
    assert torch.allclose(m.score[-1], torch.zeros(4))
    # matching A to B and B to A gives the same score (mirror-free, same band and mask)
    back = match_images(views, torch.cat((views, blank)), APIX, mask_diameter_A=DIAMETER)
    assert torch.allclose(m.score[:4], back.score.T[:4], atol=0.03)


def test_round_blob_matches_a_view_worse_than_the_view_itself(views):
    r = torch.arange(BOX, dtype=torch.float32) - BOX // 2
    blob = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * (60.0 / APIX / 2) ** 2))
    m = match_images(views, torch.cat((views, blob[None])), APIX, mask_diameter_A=DIAMETER)
    assert (m.score.diagonal()[:4] > m.score[:, 4] + 0.1).all()


def test_refuses_mismatched_boxes(views):
    with pytest.raises(ValueError, match="same even size"):
        match_images(views, views[:, :-2, :-2], APIX)
    np.testing.assert_equal(views.shape[-1], BOX)


def test_score_is_the_correlation_at_the_best_allowed_shift(views):
    """Against a round reference (no rotation matters) the score is the best normalised
    correlation over the allowed shifts, found by brute force, also when the best shift lies
    on the edge of the allowed range (a refinement there must not overshoot)."""
    from napari_class2d.compare import _normalise_in, bandpass_weights, soft_disc

    r = torch.arange(BOX, dtype=torch.float32) - BOX // 2
    blob = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * (35.0 / APIX) ** 2))
    band, max_shift_A = (100.0, 15.0), 25.0
    off_centre = torch.roll(views, 12, dims=-1)  # 42 Å away: the best allowed shift is on the edge
    m = match_images(
        off_centre,
        blob[None],
        APIX,
        mask_diameter_A=DIAMETER,
        band_A=band,
        max_shift_A=max_shift_A,
    )
    w = bandpass_weights(BOX, APIX, band)
    mask = soft_disc(BOX, DIAMETER / APIX, 0.05 * BOX)

    def prep(x):
        return _normalise_in(
            torch.fft.irfftn(torch.fft.rfftn(x, dim=(-2, -1)) * w, s=(BOX, BOX)), mask
        )

    a, b = prep(off_centre), prep(blob[None])[0]
    lim = max_shift_A / APIX
    best = torch.full((len(views),), -2.0)
    for dy in range(-8, 9):
        for dx in range(-8, 9):
            if dx * dx + dy * dy <= lim**2:
                cc = (a * torch.roll(b, (dy, dx), (-2, -1))).sum(dim=(-2, -1))
                best = torch.maximum(best, cc)
    # sub-pixel refinement may add a little to the integer-shift optimum, never much
    assert (m.score[:, 0] >= best - 0.02).all() and (m.score[:, 0] <= best + 0.05).all(), (
        m.score[:, 0],
        best,
    )
