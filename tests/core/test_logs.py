"""Log lines: a log file that cannot be written is said once, and the command goes on."""

from pneumo.core.logs import log, logging_to


def test_a_full_log_device_is_one_line_on_stderr_and_no_failure(capsys):
    with logging_to("/dev/full"):  # every write fails with "No space left on device"
        for i in range(3):
            log.info("line %d", i)
    errors = [line for line in capsys.readouterr().err.splitlines() if "cannot write the log file" in line]
    assert len(errors) == 1 and "/dev/full" in errors[0] and "No space left" in errors[0]
