"""The surrogate's measurements on disk (devices/pim/measurements.py): a surrogate read back from the store gives
exactly what a freshly measured one gives, without running the engine."""

from __future__ import annotations

import numpy as np
import pytest

from l3.devices.pim.measurements import MeasurementStore
from l3.devices.pim.surrogate import PimSurrogate
from l3.devices.pim.timing import RankEngine
from l3.specs.dram import DramSpec, get_org, get_timing
from l3.specs.model import get_model
from l3.specs.pim import PimSpec

DRAM = DramSpec(timing=get_timing("ddr4-3200"), org=get_org("ddr4-l3-2tb"))
MODEL = get_model("llama-3-8b")
CONTEXTS = np.array([1, 17, 700, 4096, 30000, 131072, 5, 2500])  # in and beyond the measured range
RANKS = np.array([0, 1, 2, 3, 0, 1, 2, 3])


def work(s: PimSurrogate) -> list[np.ndarray]:
    return [*s.rank_work(CONTEXTS, RANKS, 4), s.uniform_cycles(np.array([1, 3]), np.array([900, 70000]))]


def test_a_surrogate_read_from_the_store_runs_no_engine_and_answers_the_same(tmp_path, monkeypatch):
    path = tmp_path / "m.sqlite"
    fresh = PimSurrogate(DRAM, PimSpec(), MODEL, MeasurementStore("k", path))
    expected = work(fresh)  # measures its pieces and stores them
    monkeypatch.setattr(RankEngine, "run", lambda *a, **k: pytest.fail("the engine ran"))
    stored = PimSurrogate(DRAM, PimSpec(), MODEL, MeasurementStore("k", path))
    for a, b in zip(work(stored), expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert stored.s_hi == fresh.s_hi


def test_the_store_keeps_configurations_apart(tmp_path):
    path = tmp_path / "m.sqlite"
    MeasurementStore("a", path).put("x", np.arange(3.0))
    assert MeasurementStore("b", path).load() == {}
    np.testing.assert_array_equal(MeasurementStore("a", path).load()["x"], [0.0, 1.0, 2.0])


def test_an_unusable_store_warns_and_the_surrogate_measures_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("L3_PIM_STORE", str(blocker / "m.sqlite"))
    with pytest.warns(UserWarning, match="measurement store unavailable"):
        assert MeasurementStore.open("k") is None
    monkeypatch.setenv("L3_PIM_STORE", "off")
    assert MeasurementStore.open("k") is None
