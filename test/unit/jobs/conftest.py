"""Fixtures shared by the job-service tests."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sglang_harli.jobs.store import JobStore


@pytest.fixture
def write_lock():
    """Another process holds the database's write lock (BEGIN IMMEDIATE) for ``seconds``."""
    procs = []

    def hold(store: JobStore, seconds: float = 30.0) -> subprocess.Popen:
        code = (
            "import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(float(sys.argv[2]))\n"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(store.db_path), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "locked"
        procs.append(proc)
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()
