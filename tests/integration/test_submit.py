"""The CronJob's submitter against the test cluster's job API: one Ray job per scheduled run,
followed to its end, exit 0 only for SUCCEEDED."""

from __future__ import annotations

import io
import sys
import threading
import time

import pytest

from deltagrad_ray.jobs.submit import main, run, submission_id

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_submission_ids_come_from_the_scheduled_time():
    # Kubernetes names a CronJob's Jobs <cronjob>-<scheduled minute since the epoch>
    assert submission_id("deltagrad-bulk-erasure-29936280") == "bulk-erasure-20261202T0200Z"
    assert submission_id("deltagrad-bulk-erasure-29936280") == submission_id("deltagrad-bulk-erasure-29936280")
    assert submission_id("Erasure_Now") == "bulk-erasure-erasure-now"         # a Job made by hand
    assert main(["--address", "http://127.0.0.1:1", "--job-name", "x"]) == 2   # no command after --


@pytest.fixture(scope="module")
def dashboard(ray_cluster):
    return "http://" + ray_cluster.head_node.address_info["webui_url"]


def test_submits_once_follows_and_succeeds(dashboard):
    from ray.job_submission import JobSubmissionClient
    sid = f"bulk-erasure-test-{time.time_ns()}"
    entry = [sys.executable, "-c", "print('erased'); print('{\"applied\": 3, \"report\": \"s3://b/r.md\"}')"]
    out = io.StringIO()
    assert run(dashboard, sid, entry, poll=0.5, out=out) == 0
    assert f"submitted {sid}" in out.getvalue() and f"{sid}: SUCCEEDED" in out.getvalue()
    # the scheduler's log says what the job did and where its report is
    assert f'{sid} result: {{"applied": 3, "report": "s3://b/r.md"}}' in out.getvalue()
    assert f"{sid} report: s3://b/r.md" in out.getvalue()
    # a retried pod of the same scheduled run: Ray knows the id, nothing is submitted again
    out = io.StringIO()
    assert run(dashboard, sid, entry, poll=0.5, out=out) == 0
    assert "is known to Ray (SUCCEEDED): following it, not submitting again" in out.getvalue()
    jobs = [j for j in JobSubmissionClient(dashboard).list_jobs() if j.submission_id == sid]
    assert len(jobs) == 1


def test_failed_and_stopped_jobs_exit_non_zero(dashboard):
    from ray.job_submission import JobSubmissionClient
    out = io.StringIO()
    failed = f"bulk-erasure-fail-{time.time_ns()}"
    assert run(dashboard, failed, [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], poll=0.5,
               out=out) == 1
    assert f"{failed}: FAILED" in out.getvalue() and "| boom" in out.getvalue()
    stopped = f"bulk-erasure-stop-{time.time_ns()}"
    client = JobSubmissionClient(dashboard)

    def stop_when_running():
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if str(client.get_job_status(stopped).value) == "RUNNING":
                    client.stop_job(stopped)
                    return
            except RuntimeError:
                pass
            time.sleep(0.3)
    t = threading.Thread(target=stop_when_running)
    t.start()
    out = io.StringIO()
    code = run(dashboard, stopped, [sys.executable, "-c", "import time; time.sleep(60)"], poll=0.5, out=out)
    t.join()
    assert code == 1 and f"{stopped}: STOPPED" in out.getvalue()   # `ray job submit` would exit 0 here
