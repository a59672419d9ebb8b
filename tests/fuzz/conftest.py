"""Hypothesis settings of the fuzz tests: a small budget in CI (the default), a long one for a nightly run.

    pytest tests/fuzz                                   # profile ci: 2 examples per config key, 60 per reader
    HYPOTHESIS_PROFILE=nightly pytest tests/fuzz        # 100 per key, 3000 per reader (about an hour on 2 cores)
    pytest tests/fuzz --hypothesis-show-statistics      # examples and time of each reader test

CI is derandomized: the same examples on every run, no example database (each config key draws from a seed of its
own name, so that the keys do not all get the same values). The nightly profile draws new examples each night and
keeps the failing ones in .hypothesis/, to be tried first next time. The budgets are in tests/fuzz/strategies.py.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]

settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=_SLOW_IS_FINE)
settings.register_profile("nightly", deadline=None, print_blob=True, suppress_health_check=_SLOW_IS_FINE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
