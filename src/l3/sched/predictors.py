"""Online predictors of a sub-batch's GPU time and memory-side (PIM) attention time.

Both learn only from times the executor reports (simulated or measured), never from the cost models:
- PIM: least-squares linear model of [slowest channel's decode tokens, decode tokens, decode requests,
  prefill tokens written]; attention is bandwidth-bound, so time is close to linear in these.
- GPU: random-forest regression (scikit-learn) of [prefill chunk tokens, tokens already prefilled
  (attention work), decode requests]; GEMM time is a step function of tokens (tiles, waves), which trees follow.
Each keeps a sliding window of recent observations and refits as it grows. An executor whose time is real (the
engine) caps the share of its wall time the forest's refits take (`ForestPredictor.cap_refit_time`); the
simulator refits on the count rule alone, so its results depend on the seed alone.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

N_TREES = 24  # trees per forest (our assumption: enough to average out single trees' steps, cheap to refit)


class _Windowed:
    """The last `window` observations, oldest first, as array views (`x`: rows of features, `y`), kept in a
    buffer of twice the window that is compacted when full (amortised O(1) per observation)."""

    def __init__(self, window: int):
        self.window = window
        self._x: np.ndarray | None = None  # allocated at the first observation (its feature count)
        self._y = np.empty(2 * window)
        self._start = self._end = 0
        self.seen = 0

    def add(self, x: np.ndarray, y: float) -> None:
        x = np.asarray(x, float)
        if self._x is None:
            self._x = np.empty((2 * self.window, len(x)))
        if self._end == len(self._y):  # compact: keep the newest window - 1 rows at the front
            keep = self.window - 1
            self._x[:keep] = self._x[self._end - keep:self._end]
            self._y[:keep] = self._y[self._end - keep:self._end]
            self._start, self._end = 0, keep
        self._x[self._end], self._y[self._end] = x, float(y)
        self._end += 1
        self._start = max(self._start, self._end - self.window)
        self.seen += 1

    @property
    def x(self) -> np.ndarray:
        return self._x[self._start:self._end] if self._x is not None else np.empty((0, 0))

    @property
    def y(self) -> np.ndarray:
        return self._y[self._start:self._end]


class LinearPredictor(_Windowed):
    """y ~ w . [x, 1], least squares over the window, refit lazily when a prediction needs it."""

    def __init__(self, window: int):
        super().__init__(window)
        self._w: np.ndarray | None = None

    def add(self, x, y) -> None:
        super().add(x, y)
        self._w = None

    @property
    def w(self) -> np.ndarray | None:
        if self._w is None and self.seen:
            X = np.column_stack([self.x, np.ones(len(self.y))])
            self._w = np.linalg.lstsq(X, self.y, rcond=None)[0]
        return self._w

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, float))
        if self.w is None:
            return np.full(len(x), np.nan)
        return np.maximum(x @ self.w[:-1] + self.w[-1], 0.0)


class ForestPredictor(_Windowed):
    """Random forest of N_TREES regression trees, refit when the number of observations grows by `refit_growth`
    (and every 256 after). With a time cap (`cap_refit_time`), a refit that falls due waits until the wall time
    since the last refit ended is at least that refit's duration over the cap.

    The trees are scikit-learn's DecisionTreeRegressor, grown as its RandomForestRegressor grows them from the
    same seed: one seed per tree drawn in turn from the predictor's stream, each tree fitted on a bootstrap of
    the window (drawn from the tree's seed) passed as sample counts, all features at every split. So the forest
    is scikit-learn's (a test checks tree for tree), without the per-tree estimator cloning, parameter
    round-trips and input checks that made up about a quarter of each refit."""

    def __init__(self, window: int, seed: int = 0, refit_growth: float = 1.25):
        super().__init__(window)
        self._cache: dict[tuple, float] = {}  # predictions of the current fit (feature rows repeat a lot)
        self._trees: list[tuple[list, ...]] = []  # each fitted tree as lists: left, right, feature, threshold, value
        self._fitted_at = 0
        self._seed, self._growth = seed, refit_growth
        self._rng = np.random.RandomState(seed)  # reseeded for every draw (`fit_trees`)
        self._cap: float | None = None  # the share of wall time refits may take (None: no cap)
        self._wait_until = 0.0  # perf_counter before which a capped refit waits

    def cap_refit_time(self, share: float) -> None:
        """Refits take at most `share` (0-1] of the wall time from now on (for executors whose time is real)."""
        if not 0.0 < share <= 1.0:
            raise ValueError(f"refit time share must be in (0, 1], got {share}")
        self._cap = share
        import sklearn.tree  # noqa: F401 - ~0.5-1 s, paid now rather than by the first refit mid-run

    def add(self, x, y) -> None:
        super().add(x, y)
        grown = self.seen >= max(self._fitted_at * self._growth, self._fitted_at + 1)
        due = grown or self.seen - self._fitted_at >= 256
        if not due or len(self.y) < 4:
            return
        if self._cap is None:
            self._refit()
            return
        t0 = time.perf_counter()  # (scikit-learn was imported with the cap: a refit's time is its fit alone)
        if t0 >= self._wait_until:
            self._refit()
            t1 = time.perf_counter()
            self._wait_until = t1 + (t1 - t0) / self._cap

    def _refit(self) -> None:
        self._trees = [(t.children_left.tolist(), t.children_right.tolist(), t.feature.tolist(),
                        t.threshold.tolist(), t.value.reshape(-1).tolist()) for t in self.fit_trees()]  # fmt: skip
        self._cache.clear()
        self._fitted_at = self.seen

    def fit_trees(self) -> list:
        """The forest's trees (scikit-learn `Tree` objects) fitted on the window, as described above."""
        from sklearn import config_context  # imported on first fit: seconds, and rarely needed
        from sklearn.tree import DecisionTreeRegressor

        x = np.ascontiguousarray(self.x, dtype=np.float32)  # the dtypes the forest's own checks convert to
        y = np.ascontiguousarray(self.y, dtype=np.float64).reshape(-1, 1)
        n = len(y)
        # One generator reseeded for each use: it draws what a new RandomState(seed) would (scikit-learn's
        # check_random_state makes one from an int seed), and reseeding costs about 1 us against 75 us to make one.
        rng = self._rng
        rng.seed(self._seed)
        seeds = [rng.randint(np.iinfo(np.int32).max) for _ in range(N_TREES)]
        trees = []
        with config_context(skip_parameter_validation=True):  # fixed, valid parameters
            for seed in seeds:
                rng.seed(seed)
                counts = np.bincount(rng.randint(0, n, n), minlength=n).astype(np.float64)
                rng.seed(seed)
                tree = DecisionTreeRegressor(random_state=rng)
                tree.fit(x, y, sample_weight=counts, check_input=False)  # inputs made as the checks would
                trees.append(tree.tree_)
        return trees

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, float))
        if not self._trees:
            return np.full(len(x), np.nan)
        keys = [tuple(row) for row in x.tolist()]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            for i, row in zip(missing, x[missing].astype(np.float32).tolist(), strict=True):
                self._cache[keys[i]] = self._forest_value(row)
        return np.array([self._cache[k] for k in keys])

    def _forest_value(self, row: list[float]) -> float:
        """The forest's prediction for one row: the mean of its trees' leaf values, each tree walked as
        scikit-learn walks it (float32 features, left when <= threshold). The scheduler asks a few rows at a
        time, where walking plain lists is several times faster than scikit-learn's per-call dispatch."""
        total = 0.0
        for left, right, feature, threshold, value in self._trees:
            n = 0
            while left[n] != -1:
                n = left[n] if row[feature[n]] <= threshold[n] else right[n]
            total += value[n]
        return total / len(self._trees)


class ErrorLog:
    """Relative errors |predicted - measured| / measured of one predictor: all of them, or the last `window`
    (a long-running server keeps a bounded record)."""

    def __init__(self, window: int | None = None):
        self.errors: deque[float] = deque(maxlen=window)  # all of them where window is None

    def keep_last(self, window: int) -> None:
        self.errors = deque(self.errors, maxlen=window)

    def add(self, predicted: float, measured: float) -> None:
        if np.isfinite(predicted) and measured > 0:
            self.errors.append(abs(predicted - measured) / measured)

    @staticmethod
    def merged(logs: list[ErrorLog]) -> ErrorLog:
        out = ErrorLog()
        for log in logs:
            out.errors.extend(log.errors)
        return out

    def summary(self) -> dict:
        e = np.asarray(self.errors)
        if not len(e):
            return {"n": 0, "median": None, "p90": None}
        return {"n": len(e), "median": float(np.median(e)), "p90": float(np.percentile(e, 90))}
