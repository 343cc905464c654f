"""Online predictors: they learn the functions they are shown, and the forest equals scikit-learn's."""

from __future__ import annotations

import numpy as np

from l3.sched.predictors import N_TREES, ErrorLog, ForestPredictor, LinearPredictor


def test_linear_predictor_recovers_a_linear_law(rng):
    rng, _ = rng
    w = rng.uniform(0.1, 2.0, 4)
    p = LinearPredictor(window=256)
    assert np.isnan(p.predict(np.ones(4))).all()
    for _ in range(100):
        x = rng.uniform(0, 100, 4)
        p.add(x, x @ w + 3.0)
    x = rng.uniform(0, 100, (10, 4))
    np.testing.assert_allclose(p.predict(x), x @ w + 3.0, rtol=1e-8)


def test_forest_is_scikit_learns_tree_for_tree_and_learns_steps(rng):
    from sklearn.ensemble import RandomForestRegressor

    rng, _ = rng
    p = ForestPredictor(window=512, seed=3)
    f = lambda x: np.ceil(x[..., 0] / 128) * 1e-3 + 1e-5 * x[..., 2]  # noqa: E731 - a wave-quantised law
    while p.seen < 300 or p._fitted_at != p.seen:  # stop just after a refit: the trees fit the whole window
        x = np.array([rng.integers(1, 2048), rng.integers(0, 4096), rng.integers(0, 64)], float)
        p.add(x, f(x))
    xs = np.column_stack([rng.integers(1, 2048, 50), rng.integers(0, 4096, 50), rng.integers(0, 64, 50)]).astype(float)
    ref = RandomForestRegressor(n_estimators=N_TREES, random_state=3, n_jobs=1).fit(p.x, p.y)
    for ours, theirs in zip(p.fit_trees(), (e.tree_ for e in ref.estimators_), strict=True):
        for field in ("children_left", "children_right", "feature", "threshold", "value"):
            np.testing.assert_array_equal(getattr(ours, field), getattr(theirs, field))
    np.testing.assert_array_equal(p.predict(xs), ref.predict(xs.astype(np.float32)))
    err = np.abs(p.predict(xs) - f(xs)) / f(xs)
    assert np.median(err) < 0.1


def test_error_log_summary():
    log = ErrorLog()
    for pred, meas in [(1.1, 1.0), (0.9, 1.0), (2.0, 1.0), (float("nan"), 1.0)]:
        log.add(pred, meas)
    s = log.summary()
    assert s["n"] == 3 and abs(s["median"] - 0.1) < 1e-12


def test_one_batch_when_splitting_would_only_reread_the_weights():
    """HBM-PIM at GPU-only-sized batches: attention is nearly free, so two sub-batches would mostly read the
    weights twice; the scheduler falls back to one batch and is faster for it."""
    from l3.report.summary import summarize
    from l3.sim.simulator import Simulator
    from l3.specs.model import get_model
    from l3.specs.system import get_system, with_overrides
    from l3.workload import load_workload

    wl = load_workload("openr1", n_requests=60, seed=0)
    out = {}
    for fallback in (False, True):
        spec = with_overrides(get_system("hbm-pim"), {"coordination": {"single_batch_fallback": fallback}})
        out[fallback] = summarize(Simulator(spec.deploy(get_model("qwen-72b"), "paper"), wl).run())
    assert out[False]["single_batch_iterations"] == 0
    assert out[True]["single_batch_iterations"] > 0
    assert out[True]["throughput_tok_s"] > out[False]["throughput_tok_s"]
    assert out[True]["requests_completed"] == 60


def test_a_refit_time_cap_spaces_the_forests_refits(rng):
    """Under a cap, a refit that falls due waits until the time since the last one is its duration over the
    share: a tiny share keeps the first forest; without a cap every due refit runs."""
    import pytest

    rng, _ = rng
    capped, free = ForestPredictor(window=64), ForestPredictor(window=64)
    capped.cap_refit_time(1e-9)
    for _ in range(40):
        x = rng.uniform(0, 100, 3)
        capped.add(x, x.sum())
        free.add(x, x.sum())
    assert capped._fitted_at == 4 and capped.predict(np.ones(3)).item() > 0  # the first forest serves
    assert free._fitted_at >= 33  # refit at 4, 5, ..., 33 observations (growth 1.25)
    with pytest.raises(ValueError, match="share"):
        capped.cap_refit_time(0.0)
