"""A real Ray cluster on loopback: `ray start --head` on 127.0.0.1 with free ports, `ray job submit` of
`launch.train` with 2 workers on Beauty, the job reaches SUCCEEDED and its logs hold the final metrics.

The head is started with `--block` in its own session and stopped by signalling that process group (what
`ray stop` does, without touching other Ray instances on a shared machine)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow  # Ray Train worker groups take ~40 s each to start on 2 shared cores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    (gcs, dash, client, agent, agent_grpc, metrics, rt_agent, node_mgr, obj_mgr) = _free_ports(9)
    tmp = tempfile.mkdtemp(prefix="rso", dir="/tmp")
    # loopback only: no token authentication (Ray 2.60 enables it by default; a real cluster keeps it and the
    # client reads the token), so the CLI below needs no credentials
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               RAY_ADDRESS="", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS")
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt_agent}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--temp-dir={tmp}", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # the dashboard answers (e.g. 401 with authentication on)
            break
        except OSError:
            if head.poll() is not None or time.time() > deadline:
                out = head.stdout.read().decode(errors="replace") if head.poll() is not None else ""
                os.killpg(head.pid, signal.SIGKILL)
                pytest.fail(f"ray head did not come up: {out[-2000:]}")
            time.sleep(1)
    yield url, env
    os.killpg(head.pid, signal.SIGTERM)  # the head's own process group only
    try:
        head.wait(timeout=10)  # `ray start --block` often outlives SIGTERM: a 30 s wait cost every run 30 s
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    time.sleep(2)
    try:
        os.killpg(head.pid, signal.SIGKILL)  # stragglers of that group (raylet's workers), if any
    except ProcessLookupError:
        pass


def test_ray_job_submit_on_loopback(ray_head, tmp_path):
    url, env = ray_head
    env = dict(env, RAY_RUNTIME_ENV_IGNORE_GITIGNORE="1")  # ship scalerec/_C*.so with the working dir
    beauty = os.path.join(REPO, "data", "beauty", "Beauty.txt")
    entry = ["python", "-m", "launch.train", "launch/configs/beauty_distributed.yaml", f"data.path={beauty}",
             "trainer.epochs=1", "trainer.max_steps_per_epoch=3", "trainer.batch_size=64", "model.maxlen=20",
             "eval.valid_max_cases=200", "scaleout.test_max_cases=200", f"output_dir={tmp_path}/out",
             f"scaleout.ray.storage_path={tmp_path}/ray"]
    sub = subprocess.run([RAY, "job", "submit", "--address", url, "--runtime-env", "launch/runtime_env.yaml",
                          "--", *entry], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    job_id = next(w.strip("'") for line in sub.stdout.splitlines() if "submitted successfully" in line
                  for w in line.split() if w.strip("'").startswith("raysubmit_"))
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    logs = client.get_job_logs(job_id)
    final = json.loads(next(line for line in logs.splitlines() if line.startswith('{"final"')))["final"]
    assert final["world_size"] == 2 and final["global_step"] == 3 and final["valid"]["cases"] == 200
    assert "[scalerec worker] epoch 1: loss" in logs  # progress is visible in the job's logs
    assert os.path.exists(os.path.join(tmp_path, "out", "result.json"))
