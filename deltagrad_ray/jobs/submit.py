"""Submit a Ray job once per schedule slot, follow it, and exit 0 only if it SUCCEEDED.

What the bulk-erasure CronJob runs (``infra/kuberay/cronjob-bulk-erasure.yaml``)::

    python -m deltagrad_ray.jobs.submit --address http://deltagrad-head-svc:8265 --job-name "$JOB_NAME" \\
        --working-dir . -- python -m pipelines.bulk_erasure --config infra/configs/bulk_erasure.yaml

The submission id comes from the scheduled time: Kubernetes names a CronJob's Job
``<cronjob>-<scheduled time in minutes since the epoch>``, so every pod of one scheduled run (a
retried or replaced pod) derives the same id, e.g. ``bulk-erasure-20261202T0200Z``. The submitter
asks Ray for that id first and submits only if Ray does not know it (two pods racing: Ray refuses
the second submission, which then follows the first); then it follows the job to its end. Unlike
``ray job submit``, which exits 0 for a STOPPED job, the exit code is 0 only for SUCCEEDED
(1 for FAILED, STOPPED or a timeout; 2 for bad arguments).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
import time

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def submission_id(job_name: str, prefix: str = "bulk-erasure") -> str:
    """The Ray submission id of a Kubernetes Job: from the scheduled time its CronJob put in its
    name (``…-<minutes since the epoch>``), or, for a Job made by hand, from the name itself.

    >>> submission_id("deltagrad-bulk-erasure-29936280")      # scheduled 2026-12-02 02:00 UTC
    'bulk-erasure-20261202T0200Z'
    >>> submission_id("erasure-now")                          # kubectl create job --from=cronjob/…
    'bulk-erasure-erasure-now'
    """
    m = re.fullmatch(r".*-(\d{7,9})", job_name)
    if m:
        t = _dt.datetime.fromtimestamp(int(m.group(1)) * 60, _dt.timezone.utc)
        return f"{prefix}-{t:%Y%m%dT%H%MZ}"
    name = re.sub(r"[^a-z0-9-]+", "-", job_name.lower()).strip("-")
    if not name:
        raise ValueError(f"cannot derive a submission id from the job name {job_name!r}")
    return f"{prefix}-{name}"


def _status(client, sid: str) -> str | None:
    """The job's status, or None if Ray does not know the submission id."""
    try:
        return str(client.get_job_status(sid).value)
    except RuntimeError as e:  # the job API answers 404 for an unknown submission id
        if "404" in str(e) or "does not exist" in str(e):
            return None
        raise


def run(address: str, sid: str, entrypoint: list[str], *, working_dir: str | None = None, poll: float = 5.0,
        timeout: float | None = None, out=sys.stdout) -> int:
    """Submit ``entrypoint`` as ``sid`` unless Ray knows it, follow it; 0 only if it SUCCEEDED."""
    import shlex

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    status = _status(client, sid)
    if status is None:
        env = {"working_dir": working_dir} if working_dir else None
        try:
            client.submit_job(entrypoint=shlex.join(entrypoint), submission_id=sid, runtime_env=env)
            print(f"submitted {sid}: {shlex.join(entrypoint)}", file=out, flush=True)
        except RuntimeError as e:  # another pod of this scheduled run submitted it first
            if _status(client, sid) is None:
                raise
            print(f"{sid} was submitted meanwhile by another pod ({str(e).splitlines()[0][:120]}); following it",
                  file=out, flush=True)
    else:
        print(f"{sid} is known to Ray ({status}): following it, not submitting again", file=out, flush=True)
    deadline = None if timeout is None else time.time() + timeout
    last = None
    while True:
        status = _status(client, sid)
        if status != last:
            print(f"{sid}: {status}", file=out, flush=True)
            last = status
        if status in TERMINAL:
            break
        if deadline is not None and time.time() > deadline:
            print(f"{sid}: still {status} after {timeout:g} s; giving up following it (the job goes on)",
                  file=out, flush=True)
            return 1
        time.sleep(poll)
    logs = client.get_job_logs(sid).rstrip().splitlines()
    line = result_line(logs)
    if line is not None:  # what the job did, for the scheduler's own log
        print(f"{sid} result: {json.dumps(line, default=str)}", file=out, flush=True)
        if line.get("report"):
            print(f"{sid} report: {line['report']}", file=out, flush=True)
    if status != "SUCCEEDED":
        print("\n".join(f"  | {line}" for line in logs[-40:]), file=out, flush=True)
        return 1
    return 0


def result_line(logs: list[str]) -> dict | None:
    """The job's result line (the last JSON object its driver printed), None if it printed none."""
    for text in reversed(logs):
        text = text.strip()
        if text.startswith("{") and text.endswith("}"):
            try:
                obj = json.loads(text)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deltagrad_ray.jobs.submit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", required=True, help="the Ray dashboard, e.g. http://deltagrad-head-svc:8265")
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--job-name", help="the Kubernetes Job's name (the submission id derives from it)")
    who.add_argument("--submission-id", help="the submission id itself")
    ap.add_argument("--prefix", default="bulk-erasure", help="prefix of derived submission ids")
    ap.add_argument("--working-dir", help="runtime_env working_dir uploaded with the job (e.g. .)")
    ap.add_argument("--poll", type=float, default=5.0, help="seconds between status checks")
    ap.add_argument("--timeout", type=float, default=None, help="stop following after this many seconds (exit 1)")
    ap.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the job's command")
    a = ap.parse_args(argv)
    entry = a.entrypoint[1:] if a.entrypoint[:1] == ["--"] else a.entrypoint
    if not entry:
        print("error: give the job's command after --", file=sys.stderr)
        return 2
    try:
        sid = a.submission_id or submission_id(a.job_name, a.prefix)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(a.address, sid, entry, working_dir=a.working_dir, poll=a.poll, timeout=a.timeout)


if __name__ == "__main__":
    sys.exit(main())
