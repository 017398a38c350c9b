import os
import subprocess
import sys

from pneumo.core.process import idle_threads_sleep, threads_sleep_in

PROBE = """
import os, sys
from pneumo.core import process
process.busy_now = lambda: True  # a machine that others keep busy
took = process.idle_threads_sleep()
import torch
print(took, os.environ.get("OMP_WAIT_POLICY"), process.idle_threads_sleep())
"""


def probe(**env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environ).stdout.strip()


def test_idle_threads_sleep_on_a_busy_machine_before_torch_loads_and_never_override_the_user():
    assert probe() == "True PASSIVE False"  # set before torch loads; once torch is in, too late
    assert probe(OMP_WAIT_POLICY="ACTIVE") == "False ACTIVE False"  # a user's own choice stands


def test_in_a_process_that_already_imported_torch_nothing_changes():
    import torch  # noqa: F401  (the situation of a library user)

    before = os.environ.get("OMP_WAIT_POLICY")
    assert idle_threads_sleep() is False and os.environ.get("OMP_WAIT_POLICY") == before


def test_threads_sleep_only_on_a_busy_machine():
    busy, idle = {}, {}
    assert threads_sleep_in(busy, lambda: True) and busy == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert not threads_sleep_in(idle, lambda: False) and idle == {}
    user = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not threads_sleep_in(user, lambda: True) and user == {"OMP_WAIT_POLICY": "ACTIVE"}
