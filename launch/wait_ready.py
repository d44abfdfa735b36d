"""Wait until a Ray head accepts jobs: ``python -m launch.wait_ready --address http://HEAD:8265 [--timeout 300]``.

``ray start --head`` returns before the head node's dashboard agent has registered; a ``ray job submit`` in that
window fails with "No available agent to submit job, please try again later". This polls the dashboard (with
the token when ``RAY_AUTH_MODE=token``, like ``ray job submit``) and submits a no-op probe job (``true``,
submission id ``scalerec-ready-…``) until one is accepted and SUCCEEDED, then prints one line. The probe stays in
``ray job list`` (Ray 2.60 marks a job deleted right after it succeeds as FAILED instead of dropping it). Exit 0: ready; 2: the head refused the token
(the line names the variable to set; no retry); 1: not ready within ``--timeout`` seconds.
"""
from __future__ import annotations

import argparse
import sys
import time
import uuid

from launch.cluster_auth import refusal_in

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def wait_ready(address: str, timeout: float, poll: float = 1.0) -> tuple[int, str]:
    """(exit code, one line) once ``address`` accepts a job, refuses the token, or ``timeout`` passes."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    last = "no answer yet"
    probe = None
    while time.monotonic() < deadline:
        try:
            client = _client(address)
            if probe is None:
                probe = client.submit_job(entrypoint="true", submission_id=f"scalerec-ready-{uuid.uuid4().hex[:12]}",
                                          metadata={"scalerec": "launch.wait_ready probe"})
            status = str(client.get_job_status(probe)).split(".")[-1]
            if status == "SUCCEEDED":
                return 0, f"ready: {address} accepts jobs ({time.monotonic() - t0:.1f} s)"
            if status in TERMINAL:
                info = client.get_job_info(probe)
                return 1, f"not ready: the probe job {probe} on {address} ended {status}: {info.message}"
            last = f"probe job {probe} is {status}"
        except Exception as exc:  # not up yet, no agent yet, or refused
            refused = refusal_in(exc, address)
            if refused:
                return 2, refused
            last = " ".join(str(exc).split())[:300] or type(exc).__name__
        time.sleep(poll)
    hint = ("; the head's dashboard agent never registered: see dashboard_agent.log in the head's Ray session "
            "logs (e.g. its port, 52365 by default, was taken)") if "No available agent" in last else ""
    return 1, f"not ready: {address} did not accept a job within {timeout:g} s (last: {last}){hint}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.wait_ready", description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="the head's dashboard, e.g. http://HEAD:8265")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before giving up (default 300)")
    args = p.parse_args(argv)
    code, line = wait_ready(args.address, args.timeout)
    print(line if code == 0 else f"launch.wait_ready: error: {line}", file=sys.stdout if code == 0 else sys.stderr,
          flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
