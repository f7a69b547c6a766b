"""Test hooks of `--ray`, read from environment variables (tests/batch/test_ray.py): the first actor
call that creates the marker file exits at once, as a killed worker would; the driver stops for
good after writing its first batch. Unset, they do nothing."""

from __future__ import annotations

import os
import time

TEST_ACTOR_EXIT_ENV = "SKINCLF_RAY_TEST_ACTOR_EXIT"
TEST_DRIVER_HANG_ENV = "SKINCLF_RAY_TEST_DRIVER_HANG"


def actor_exit_once() -> None:
    marker = os.environ.get(TEST_ACTOR_EXIT_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)  # as a killed worker: no cleanup, no reply


def driver_hang() -> None:
    if os.environ.get(TEST_DRIVER_HANG_ENV) == "1":
        while True:  # until the test kills this process
            time.sleep(3600)
