import math

import pytest
import torch

from cdcd_composer.time_warping import TimeWarp, low_discrepancy_uniform


def sigmoid_loss(t: torch.Tensor) -> torch.Tensor:
    """A CDCD-like loss curve: low for small t, saturating at high t, steepest at t = 10."""
    return 0.1 + 5.0 / (1 + torch.exp(-2.0 * (torch.log(t) - math.log(10.0))))


def fitted_warp(shape: str = 'piecewise', refits: int = 4) -> TimeWarp:
    warp = TimeWarp(1.0, 300.0, shape=shape)
    for _ in range(refits):  # Each fit sees samples drawn through the previous warp, as in training.
        t = warp.sample_t(4096).double()
        report = warp.fit(t, sigmoid_loss(t) + 0.2 * torch.randn_like(t))
        assert report.accepted, report
    return warp


def test_starts_uniform():
    warp = TimeWarp(1.0, 300.0)
    t = torch.tensor([1.0, 50.0, 150.5, 300.0])
    torch.testing.assert_close(warp.cdf(t), ((t - 1) / 299).double())
    torch.testing.assert_close(warp.density(t), torch.full((4,), 1 / 299, dtype=torch.float64))
    steps = warp.sampling_timesteps(4)
    torch.testing.assert_close(steps, torch.tensor([300.0, 225.25, 150.5, 75.75, 1.0]))


def test_fit_recovers_a_known_sigmoid_curve():
    warp = fitted_warp()
    grid = torch.logspace(0, math.log10(300), 500, dtype=torch.float64)
    error = (warp.unnormalised(grid) - sigmoid_loss(grid)).abs().max()
    assert error < 0.6  # nats, on a 5-nat rise measured with 0.2-nat noise
    # The density concentrates where the loss changes: the median t sits near the inflection.
    assert 7.0 < warp.quantile(0.5) < 16.0
    assert warp.quantile(0.9) < 150.0


def test_cdf_is_monotone_and_inverse_round_trips():
    warp = fitted_warp()
    grid = torch.linspace(1.0, 300.0, 5001, dtype=torch.float64)
    values = warp.cdf(grid)
    assert (values[1:] >= values[:-1]).all() and values[0] == 0 and values[-1] == 1
    edges = torch.linspace(1.0, 300.0, warp.n_bins + 1, dtype=torch.float64)
    inside = (edges[:-1] + edges[1:]) / 2
    for t in (edges, inside):
        torch.testing.assert_close(warp.inverse_cdf(warp.cdf(t)).double(), t, atol=1e-4, rtol=1e-6)
    u = torch.rand(1000, dtype=torch.float64)
    torch.testing.assert_close(warp.cdf(warp.inverse_cdf(u).double()), u, atol=1e-6, rtol=0)
    # Every bin keeps at least the uniform floor mu / N of the mass.
    assert warp.masses.min() >= warp.mu / warp.n_bins - 1e-12
    torch.testing.assert_close(warp.masses.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_density_is_the_derivative_of_the_cdf():
    warp = fitted_warp()
    t = torch.linspace(1.5, 299.0, 200, dtype=torch.float64)
    h = 1e-4
    numeric = (warp.cdf(t + h) - warp.cdf(t - h)) / (2 * h)
    # Away from bin edges the piecewise-linear CDF has an exact derivative.
    width = 299.0 / warp.n_bins
    away = ((t - 1.0) / width - ((t - 1.0) / width).round()).abs() > 1e-3
    torch.testing.assert_close(numeric[away], warp.density(t)[away], rtol=1e-5, atol=1e-9)


def test_sampling_follows_the_warp():
    warp = fitted_warp()
    t = warp.sample_t(20000)
    for q in (0.1, 0.5, 0.9):
        assert abs((t <= warp.quantile(q)).double().mean() - q) < 0.01
    steps = warp.sampling_timesteps(200)
    assert steps.shape == (201,) and steps[0] == 300.0 and steps[-1] == 1.0
    assert (steps[1:] <= steps[:-1]).all()


def test_low_discrepancy_u_has_one_point_per_stratum():
    u = torch.sort(low_discrepancy_uniform(64)).values
    assert ((u >= torch.arange(64) / 64) & (u < (torch.arange(64) + 1) / 64)).all()


def test_degenerate_fits_keep_the_previous_curve():
    warp = fitted_warp()
    before = warp.state_dict()
    t = warp.sample_t(4096).double()
    cases = {
        'too few points': (t[:50], sigmoid_loss(t[:50])),
        'flat data': (t, torch.full_like(t, 3.0)),
        'explains': (t, 3.0 + torch.randn_like(t)),  # pure noise
        'does not rise': (t, 10.0 - sigmoid_loss(t)),  # decreasing: NNLS finds no rise
        'too few points (0': (t, torch.full_like(t, float('nan'))),
    }
    for reason, (tt, loss) in cases.items():
        report = warp.fit(tt, loss)
        assert not report.accepted and reason in report.reason, (reason, report)
        for key, value in before.items():
            assert torch.equal(warp.state_dict()[key], value)


def test_uniform_mixture_and_temperature():
    heights = torch.zeros(10, dtype=torch.float64)
    heights[3] = 1.0
    warp = TimeWarp(1.0, 300.0, n_bins=10, mu=0.1)
    masses = warp._masses_from_heights(heights)
    assert masses[3] == pytest.approx(0.9 + 0.01) and masses[0] == pytest.approx(0.01)
    hot = TimeWarp(1.0, 300.0, n_bins=10, mu=0.0, temperature=2.0)._masses_from_heights(
        torch.tensor([1.0, 4.0], dtype=torch.float64)
    )
    torch.testing.assert_close(hot, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))


def test_cauchy_shape_is_selectable():
    warp = fitted_warp('cauchy', refits=3)
    assert 5.0 < warp.quantile(0.5) < 25.0


def test_state_round_trip_is_exact():
    warp = fitted_warp()
    other = TimeWarp(1.0, 300.0)
    other.load_state_dict(warp.state_dict())
    u = torch.rand(100)
    assert torch.equal(other.inverse_cdf(u), warp.inverse_cdf(u))
    with pytest.raises(ValueError, match='same n_bins'):
        TimeWarp(1.0, 300.0, n_bins=50).load_state_dict(warp.state_dict())


@pytest.mark.parametrize('kwargs, message', [
    ({'t_min': 0.0}, 't_min'), ({'n_bins': 1}, 'n_bins'), ({'mu': 2.0}, 'mu'),
    ({'temperature': 0.0}, 'temperature'), ({'shape': 'spline'}, 'shape'),
])  # fmt: skip
def test_bad_arguments_fail_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TimeWarp(**kwargs)
