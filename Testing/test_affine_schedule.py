"""Schedules: values against the spec's table, alpha_t, strided reverse plans."""

import numpy as np
import pytest

from diffusionreg.affine.config import compact, full
from diffusionreg.affine.reverse import step_plan
from diffusionreg.affine.schedule import Schedule, step_std


def test_cosine_table_matches_spec():
    s = Schedule.make(65, (0.01, 0.07), (0.5, 4.0), "cosine")
    # t:       sigma_step lin, Sigma lin, sigma_step tr, Sigma tr, alpha
    table = {
        1: (0.0100, 0.0100, 0.50, 0.50, 1.00),
        2: (0.0100, 0.0142, 0.50, 0.71, 0.71),
        33: (0.040, 0.133, 2.25, 7.30, 0.30),
        65: (0.070, 0.366, 4.00, 20.7, 0.19),
    }
    for t, (ls, lc, ts, tc, a) in table.items():
        assert s.lin_step[t - 1] == pytest.approx(ls, abs=6e-4)
        assert s.lin_cum[t - 1] == pytest.approx(lc, abs=6e-4)
        assert s.tr_step[t - 1] == pytest.approx(ts, abs=6e-3)
        assert s.tr_cum[t - 1] == pytest.approx(tc, abs=6e-2)
        assert s.alpha_lin(t) == pytest.approx(a, abs=6e-3)
        assert s.alpha_tr(t) == pytest.approx(a, abs=1e-2)  # table alpha is the linear part's


def test_linear_schedule_totals():
    s = Schedule.make(65, (0.01, 0.07), (0.5, 4.0), "linear")
    assert s.lin_cum[-1] == pytest.approx(0.352, abs=1e-3)
    assert s.tr_cum[-1] == pytest.approx(19.9, abs=0.1)
    assert np.all(np.diff(s.lin_step) > 0)


def test_cumulative_is_root_sum_of_squares():
    steps = step_std(10, 0.1, 0.5)
    with pytest.warns(UserWarning, match="singular"):  # 2.5 Sigma(T) >= 1 here
        s = Schedule.make(10, (0.1, 0.5), (1, 2))
    assert s.lin_cum[4] == pytest.approx(np.sqrt((steps[:5] ** 2).sum()))
    with pytest.raises(ValueError):
        step_std(5, 0.1, 0.2, "quadratic")


def test_presets_schedule():
    assert full().timesteps == 65 and full().trans_std_vox == (0.5, 4.0)
    c = Schedule.from_config(compact())
    # compact translations are the full ones scaled by 64/256
    assert c.tr_cum[-1] == pytest.approx(20.7 * 64 / 256, rel=0.01)


def test_step_plan_full_and_strided():
    s = Schedule.make(65)
    plan = step_plan(s, None)
    assert [p[0] for p in plan] == list(range(65, 0, -1))
    assert plan[0][1] == pytest.approx(s.alpha_lin(65))
    assert plan[-1][1] == pytest.approx(1.0)
    short = step_plan(s, 13)
    assert len(short) == 13 and short[0][0] == 65 and short[-1][1] == pytest.approx(1.0)
    # each jump removes what its covered steps would remove together
    keep = np.prod([1 - s.alpha_lin(t) for t in range(65, 60, -1)])
    assert short[0][1] == pytest.approx(1 - keep)
