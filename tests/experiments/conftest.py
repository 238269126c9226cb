"""Fixtures of the study's tests."""

import pytest


@pytest.fixture
def without_plots(monkeypatch):
    """For studies whose test reads their numbers, not their pictures: the report's plots (drawn
    and checked by test_files_sections_and_schema, and drawn by the worker pool in the --jobs
    test) are skipped, seconds per study."""
    import opnorm.experiments.reproduce as reproduce

    monkeypatch.setattr(reproduce, "write_plots", lambda results, out, mapper=map: {})
