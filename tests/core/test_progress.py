import logging

import pytest

from pneumo.core.progress import progress


@pytest.fixture(autouse=True)
def batch_job(monkeypatch):
    """No terminal, and log records reach pytest's capture (the CLI turns propagation off)."""
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    monkeypatch.setattr(logging.getLogger("pneumo"), "propagate", True)


def test_batch_jobs_get_plain_log_lines(caplog):
    with caplog.at_level(logging.INFO, logger="pneumo"):
        items = list(progress(range(5), total=5, desc="decoding", unit="img", every_s=0))
    assert items == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert (
        lines[0].startswith("decoding: 1/5 img (") and len(lines) == 4
    )  # none for the last item: the caller reports the end
    assert all("\r" not in line for line in lines)


def test_quiet_for_short_loops(caplog):
    with caplog.at_level(logging.INFO, logger="pneumo"):
        assert list(progress(range(3), total=3, desc="x")) == [0, 1, 2]
    assert not caplog.records
