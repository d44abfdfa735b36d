"""A real Ray cluster on loopback, started and used the way the README's "On a Ray cluster" recipe says, with
Ray's token authentication ON (what `ray start --head` does once a token exists, and what production keeps):

    ray get-auth-token --generate > /dev/null                   # the token, in ~/.ray/auth_token
    RAY_AUTH_MODE=token ray start --head ...
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(cat ~/.ray/auth_token)"
    python -m launch.wait_ready --address http://HEAD:8265
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 ray job submit --address http://HEAD:8265 --runtime-env ... -- python -m launch.train ...

HOME is a fresh temporary folder for the head and the client (a new machine: no token until the recipe makes
one; the user's ~/.ray is never touched); TORCH_EXTENSIONS_DIR keeps pointing at the user's build cache. The ports are free ones on 127.0.0.1, not the recipe's defaults, so
that the test can run beside other Ray instances. One head serves the module: a 2-worker Beauty job to
SUCCEEDED with its metrics in the logs; submits without or with a wrong token get Ray's refusal and nothing
runs; `launch.train` and `launch.encode` refused by the cluster end with one line naming the variable to set.

The head is started with `--block` in its own session and stopped by signalling that process group (what
`ray stop` does, without touching other Ray instances on a shared machine)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow  # a Ray Train worker group takes ~40 s to start on 2 shared cores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
AUTH_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop(head):
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


@pytest.fixture(scope="module")
def auth_head():
    (gcs, dash, client, agent, agent_grpc, metrics, rt_agent, node_mgr, obj_mgr) = _free_ports(9)
    tmp = tempfile.mkdtemp(prefix="rso", dir="/tmp")  # short: Ray's socket paths live under --temp-dir
    home = os.path.join(tmp, "home")
    os.makedirs(home)
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.update(HOME=home, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               # the ops DeepSpeed compiles on first use (shm_comm: 2 to 3 min on 2 busy cores) stay where they are
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR")
               or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions"))
    # the recipe, on the head: make the token, then start Ray with token authentication on
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=120)
    token_file = os.path.join(home, ".ray", "auth_token")
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt_agent}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--temp-dir={tmp}", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=dict(env, RAY_AUTH_MODE="token"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    # the recipe, on the client: token mode and the head's token, then wait until the head accepts jobs
    with open(token_file) as f:
        token = f.read().strip()
    client_env = dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    ready = subprocess.run([sys.executable, "-m", "launch.wait_ready", "--address", url, "--timeout", "240"],
                           cwd=REPO, env=client_env, capture_output=True, text=True, timeout=300)
    if ready.returncode != 0:
        alive = head.poll() is None
        _stop(head) if alive else None
        out = "" if alive else head.stdout.read().decode(errors="replace")[-2000:]
        pytest.fail(f"the head did not accept jobs: {ready.stdout}{ready.stderr}{out}")
    assert ready.stdout.startswith(f"ready: {url} accepts jobs"), ready.stdout
    yield SimpleNamespace(url=url, gcs=f"127.0.0.1:{gcs}", env=env, client_env=client_env, token=token, home=home)
    _stop(head)
    shutil.rmtree(tmp, ignore_errors=True)  # the session's logs and the token


def _jobs(head):
    from ray.job_submission import JobSubmissionClient

    # the pytest process itself is not in token mode: hand the SDK the token as a header
    return JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token}"})


def test_readme_recipe_job_succeeds_with_token_auth(auth_head, tmp_path):
    env = dict(auth_head.client_env, RAY_RUNTIME_ENV_IGNORE_GITIGNORE="1")  # ship scalerec/_C*.so along
    beauty = os.path.join(REPO, "data", "beauty", "Beauty.txt")
    entry = ["python", "-m", "launch.train", "launch/configs/beauty_distributed.yaml", f"data.path={beauty}",
             "trainer.epochs=1", "trainer.max_steps_per_epoch=3", "trainer.batch_size=64", "model.maxlen=20",
             "eval.valid_max_cases=200", "scaleout.test_max_cases=200", f"output_dir={tmp_path}/out",
             f"scaleout.ray.storage_path={tmp_path}/ray"]
    sub = subprocess.run([RAY, "job", "submit", "--address", auth_head.url, "--runtime-env", "launch/runtime_env.yaml",
                          "--", *entry], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    job_id = next(w.strip("'") for line in sub.stdout.splitlines() if "submitted successfully" in line
                  for w in line.split() if w.strip("'").startswith("raysubmit_"))
    from ray.job_submission import JobStatus

    client = _jobs(auth_head)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    logs = client.get_job_logs(job_id)
    final = json.loads(next(line for line in logs.splitlines() if line.startswith('{"final"')))["final"]
    assert final["world_size"] == 2 and final["global_step"] == 3  # both workers, the capped epoch
    for split in ("valid", "test"):
        assert final[split]["cases"] > 0 and 0.0 <= final[split]["NDCG@10"] <= 1.0, final[split]
    assert "[scalerec worker] epoch 1: loss" in logs  # progress is visible in the job's logs
    assert os.listdir(os.path.join(tmp_path, "out"))  # the job wrote to the client's path (shared storage)


@pytest.mark.parametrize("extra, refusal", [
    ({}, "Token authentication is enabled but no authentication token was found"),  # the token file is
    # there (HOME is the head's), but without RAY_AUTH_MODE=token the CLI does not send it
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}, "the authentication token is invalid"),
])
def test_submit_without_the_token_is_refused_and_nothing_runs(auth_head, tmp_path, extra, refusal):
    marker = tmp_path / "ran"
    before = {j.submission_id for j in _jobs(auth_head).list_jobs()}
    sub = subprocess.run([RAY, "job", "submit", "--address", auth_head.url, "--", "touch", str(marker)],
                         cwd=REPO, env=dict(auth_head.env, **extra), capture_output=True, text=True, timeout=120)
    out = sub.stdout + sub.stderr
    assert sub.returncode != 0 and "AuthenticationError" in out and refusal in out, out[-2000:]
    assert {j.submission_id for j in _jobs(auth_head).list_jobs()} == before
    assert not marker.exists()


def test_launch_entrypoints_refused_by_the_cluster_print_one_line(auth_head, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"id": "a", "text": "hello"}\n')
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    runs = {  # (command, environment, what the one line must say)
        "train, no token mode": (
            ["launch.train", "launch/configs/beauty_distributed.yaml", f"output_dir={tmp_path}/t"],
            dict(auth_head.env, RAY_ADDRESS=auth_head.gcs),
            "requires its authentication token and none was sent (RAY_AUTH_MODE is unset): set RAY_AUTH_MODE=token "
            "and RAY_AUTH_TOKEN="),
        "encode, wrong token": (
            ["launch.encode", "--model", "smollm2", "--input", str(texts), "--output", str(tmp_path / "e"),
             "--address", auth_head.gcs],
            dict(auth_head.env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token"),
            "refused the authentication token from RAY_AUTH_TOKEN: set RAY_AUTH_TOKEN to"),
        "encode, token mode without a token": (  # Ray itself would abort the process in C++ here
            ["launch.encode", "--model", "smollm2", "--input", str(texts), "--output", str(tmp_path / "e"),
             "--address", auth_head.gcs],
            dict(auth_head.env, RAY_AUTH_MODE="token", HOME=str(empty_home)),
            "RAY_AUTH_MODE=token but no token was found"),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", *cmd], cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (cmd, env, _) in runs.items()}
    for name, p in procs.items():
        out, err = p.communicate(timeout=180)
        lines = err.strip().splitlines()
        prog = runs[name][0][0]
        assert p.returncode == 2 and len(lines) == 1, f"{name}: rc={p.returncode}\n{err[-3000:]}"
        assert lines[0].startswith(f"{prog}: error: ") and runs[name][2] in lines[0], f"{name}: {lines[0]}"
        assert not out.strip()
    assert not (tmp_path / "e").exists()  # nothing was written
