"""How busy other processes keep the machine (pneumo.core.load)."""

import pytest

from pneumo.core import load


def test_other_work_is_the_machines_busy_time_less_this_processs():
    ticks = load.TICKS
    samples = iter([(0.0, 0, 0), (1.0, 3 * ticks, ticks), (1.1, 3 * ticks, ticks), (2.0, 4 * ticks, 2 * ticks)])
    gauge = load.OtherWork(every=0.0, read=lambda: next(samples))
    assert gauge.cores() == pytest.approx(2.0)  # 3 cores busy in a second, 1 of them this process
    assert gauge.cores() == pytest.approx(0.0)  # a tenth of a second with no tick: nobody else
    assert gauge.cores() == pytest.approx(0.0)
    assert load.OtherWork(read=lambda: None).cores() == 0.0  # no /proc: no other work known


def test_a_machine_is_busy_when_others_keep_half_a_core_busy():
    ticks = load.TICKS

    def machine(others: float):
        # (time, the machine's busy ticks, this process's) before and after a fifth of a second
        samples = iter([(0.0, 0, 0), (0.2, round((others + 1) * 0.2 * ticks), round(0.2 * ticks))])
        return lambda: next(samples)

    assert load.busy_now(0.0, read=machine(2.0)) and load.busy_now(0.0, read=machine(0.5))
    assert not load.busy_now(0.0, read=machine(0.0)) and not load.busy_now(0.0, read=machine(0.25))
