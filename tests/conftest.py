"""Shared fixtures: tiny models per family (built once per session) and a `deepspeed` launcher."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data")


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` repeat a scenario another test already covers on a second configuration (another
    ZeRO stage, another estimator); they are skipped unless RUN_SLOW=1 or `-m` names them, so that the
    default run stays well inside CI's time limit."""
    if os.environ.get("RUN_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow suite: RUN_SLOW=1 bash tests/run.sh runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(family) -> path of a random-init tiny model + tokenizer of that family (cached per session)."""
    from utils.tiny import make_tiny_model

    made = {}

    def get(family: str = "llama") -> str:
        if family not in made:
            made[family] = make_tiny_model(family, str(tmp_path_factory.mktemp(f"tiny-{family}")))
        return made[family]

    return get


@pytest.fixture(scope="session")
def tokenizer_of(tiny_dir):
    from transformers import AutoTokenizer

    cache = {}

    def get(family: str = "llama"):
        if family not in cache:
            cache[family] = AutoTokenizer.from_pretrained(tiny_dir(family))
        return cache[family]

    return get


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_shm(port: int) -> list[str]:
    """Remove DeepSpeed's shared-memory buffers of a run that was killed (normal exits clean up);
    returns the paths it found."""
    from utils.ds import remove_shm_buffers

    return remove_shm_buffers(port)


def run_deepspeed(script: str, args: list[str], num_gpus: int = 2, timeout: int = 600,
                  check: bool = True) -> subprocess.CompletedProcess:
    """Launch `deepspeed --num_gpus N script args` from the repo root; returns the finished process."""
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(num_gpus), "--master_port", str(port),
           os.path.join(REPO, script), *map(str, args)]
    # PYTHONFAULTHANDLER: a rank that dies on a signal (SIGABRT, SIGSEGV) prints its Python stacks.
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONFAULTHANDLER="1")
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        left = clean_shm(port)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}")
    if check:  # a run that ended normally removed its own /dev/shm buffers (utils.ds.finish)
        assert not left, left
    return p


def run_python(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python script args` as one process (for error-path tests)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(p: subprocess.CompletedProcess, expected: str, what: str = "") -> None:
    """The run failed as bad input should: exit status 2, a message matching `expected` (a regex) on
    stderr, no Python traceback."""
    assert p.returncode == 2, (what, p.returncode, p.stderr[-2000:])
    assert re.search(expected, p.stderr), (what, expected, p.stderr[-2000:])
    assert "Traceback" not in p.stdout + p.stderr, (what, p.stderr[-2000:])


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def ultrafeedback(row: dict, messages: bool = True) -> dict:
    """A {"prompt", "chosen", "rejected"} row of data/preference.jsonl (or a {"prompt", "response"} row of
    data/sft.jsonl, as chosen only) in the ultrafeedback_binarized layout: chosen/rejected as whole
    conversations that repeat the user turn, scores, an id, and (optionally) a `messages` column holding
    the chosen conversation."""
    user = {"role": "user", "content": row["prompt"]}
    out = {"prompt": row["prompt"], "prompt_id": str(len(row["prompt"])),
           "chosen": [user, {"role": "assistant", "content": row.get("chosen", row.get("response"))}],
           "score_chosen": 8.0}
    if "rejected" in row:
        out.update(rejected=[user, {"role": "assistant", "content": row["rejected"]}], score_rejected=3.0)
    if messages:
        out["messages"] = out["chosen"]
    return out


def save_to_disk(rows: list[dict], path) -> str:
    """A `datasets.Dataset.save_to_disk` directory of `rows`."""
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def hub_layout(rows: list[dict], path) -> str:
    """A directory laid out like a hub dataset repository: data/train-00000-of-00001.parquet."""
    import datasets

    datasets.disable_progress_bars()
    os.makedirs(os.path.join(path, "data"), exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(os.path.join(path, "data", "train-00000-of-00001.parquet"))
    return str(path)


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def last_by_step(metrics: list[dict], split: str = "train", key: str = "loss") -> dict:
    """The last logged value per step (a killed run's lines after its checkpoint are redone on resume)."""
    return {m["step"]: m[key] for m in metrics if m["split"] == split and key in m}


def partial(out: str) -> str:
    """Where a run writes until it has finished (utils/output.py)."""
    return os.path.normpath(out) + ".partial"


def checkpoints_of(out: str) -> list[int]:
    root = os.path.join(partial(out), "checkpoints")
    return sorted(int(d.split("-")[1]) for d in os.listdir(root) if re.fullmatch(r"step-\d+", d)) if os.path.isdir(
        root) else []


def run_killed_after_checkpoint(script: str, args: list[str], out: str, newer_than: int = 0,
                                timeout: float = 300) -> str:
    """Start a 2-rank run, SIGKILL the whole process group once a checkpoint after step `newer_than` is
    complete (a hard kill: nothing runs after it)."""
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), os.path.join(REPO, script), *args]
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            done = [s for s in checkpoints_of(out) if s > newer_than]
            if done:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return f"step-{max(done)}"
            if proc.poll() is not None:
                raise AssertionError(f"run finished before a checkpoint was written (rc {proc.returncode})")
            time.sleep(0.05)
        raise AssertionError("no checkpoint appeared in time")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        clean_shm(port)


def _session_alive(sid: int) -> list[int]:
    import psutil

    alive = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
    return alive


def train_lines(out: str) -> int:
    path = os.path.join(partial(out), "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum('"split": "train"' in line for line in f)


def run_stopped(script: str, args: list[str], out: str, after: int, sig=signal.SIGTERM, target: str = "launcher",
                env: dict | None = None, timeout: float = 300, ignore_hangup: bool = False) -> dict:
    """Start a 2-rank run in a session of its own, send `sig` to `target` once OUT.partial/metrics.jsonl
    has `after` train lines, and wait until every process of the session has ended; that must take under
    60 s and leave no /dev/shm buffer. `script` is a program (started with `deepspeed`) or a launch script
    (`launch/run.sh STEP`, `launch/pipeline.sh`: started with bash, `env` sets it up). `target`:
    "launcher" (the process started: `deepspeed` or the script), "rank1" (that rank's process alone) or
    "group" (every process of the job, as a closed terminal sends SIGHUP); `ignore_hangup` starts the job
    as `nohup` does.
    Returns rc, seconds (signal to last exit), output, and the stop checkpoint's step."""
    import psutil

    port = free_port()
    if script.endswith(".sh") or script.startswith("launch/"):
        cmd = ["bash", *script.split(), *args]
    else:
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), os.path.join(REPO, script), *args]
    full_env = dict(os.environ, PYTHONPATH=REPO, MASTER_PORT=str(port), **(env or {}))
    os.makedirs(os.path.dirname(os.path.normpath(out)), exist_ok=True)
    log = open(os.path.normpath(out) + ".stop.log", "w+")
    # SIGHUP's disposition is inherited: set it either way, so a test suite itself started under `nohup`
    # still gives the job a terminal's default.
    hangup = signal.SIG_IGN if ignore_hangup else signal.SIG_DFL
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, hangup))
    deadline = time.time() + timeout
    try:
        while train_lines(out) < after:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise AssertionError(f"run ended or stalled before step {after} (rc {proc.poll()}):\n{log.read()[-4000:]}")
            time.sleep(0.05)
        if target in ("launcher", "group"):
            victim = proc.pid
        else:
            ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if "--local_rank=1" in " ".join(p.cmdline())]
            victim = ranks[0].pid
        t0 = time.time()
        if target == "group":
            os.killpg(proc.pid, sig)
        else:
            os.kill(victim, sig)
        while _session_alive(proc.pid) and time.time() - t0 < 120:
            time.sleep(0.1)
        seconds = time.time() - t0
        rc = proc.wait(timeout=10)
    finally:
        if _session_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        left = clean_shm(port)
    log.seek(0)
    output = log.read()
    log.close()
    assert seconds < 60, (seconds, output[-3000:])
    assert not left, left
    stopped = re.findall(r"stopped after step (\d+)", output)  # a launch script logs the job elsewhere
    step = int(stopped[-1]) if stopped else max(checkpoints_of(out), default=None)
    return {"rc": rc, "seconds": seconds, "output": output, "step": step}


class PlainEngine:
    """What the pipeline needs of a DeepSpeed engine, around a plain model (ZeRO-0 semantics)."""

    def __init__(self, module, stage: int = 0):
        self.module, self.stage, self.optimizer = module, stage, None

    def __call__(self, *a, **k):
        return self.module(*a, **k)

    def __getattr__(self, name):  # DeepSpeedEngine forwards unknown attributes to its module too
        return getattr(self.module, name)

    def zero_optimization_stage(self):
        return self.stage

    def eval(self):
        self.module.eval()

    def train(self, mode: bool = True):
        self.module.train(mode)
