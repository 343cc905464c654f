"""Fuzzed input files (tests/fuzz.py): every loader returns a valid result or the project's error, never another
exception, and never loses a row or a request. A bounded run here; bench/fuzz_loaders.py runs longer."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import LOADERS


@pytest.mark.parametrize("loader", list(LOADERS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_fuzzed_files_load_or_fail_with_the_projects_error(tmp_path, loader, data):
    strategy, fname, check = LOADERS[loader]
    drawn = data.draw(strategy)
    text, *rows = drawn if isinstance(drawn, tuple) else (drawn,)
    path = tmp_path / fname
    path.write_text(text)
    check(path, *rows)
