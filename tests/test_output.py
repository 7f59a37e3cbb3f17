"""Output directories, the inputs' fingerprint, the world-size independent data position and stop
requests, without DeepSpeed processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from conftest import REPO
from utils import signals
from utils.errors import UserError
from utils.output import (check_output_dir, finish_output_dir, first_difference, fingerprint, partial_dir,
                          prepare_partial, status)


def run_args(tmp_path, **kw):
    data = tmp_path / "d.jsonl"
    if not data.exists():
        data.write_text('{"prompt": "a", "response": "b"}\n')
    model = tmp_path / "model"
    if not model.exists():
        model.mkdir()
        (model / "config.json").write_text("{}")
        (model / "model.safetensors").write_bytes(b"x" * 10)
    base = dict(output_dir=str(tmp_path / "out"), resume=False, overwrite_output_dir=False, local_rank=-1,
                model_name_or_path=str(model), data_path=[str(data)], eval_data_path=[], learning_rate=1e-3,
                per_device_train_batch_size=8, log_interval=10)
    base.update(kw)
    return SimpleNamespace(**base)


def finished_run(args, metrics: str = '{"step": 1}\n') -> None:
    part = prepare_partial(args)
    for name in ("config.json", "model.safetensors", "args.json"):
        open(os.path.join(part, name), "w").write(name)
    open(os.path.join(part, "metrics.jsonl"), "w").write(metrics)
    finish_output_dir(args, {"step": "sft"})


def test_finished_run_is_refused_and_replaced_only_at_the_end(tmp_path):
    args = run_args(tmp_path)
    check_output_dir(args)  # nothing there yet
    finished_run(args, '{"old": 1}\n')
    out = args.output_dir
    assert sorted(os.listdir(out)) == ["args.json", "config.json", "done.json", "metrics.jsonl", "model.safetensors"]
    assert not os.path.exists(partial_dir(out))
    with pytest.raises(UserError, match=f"--output_dir '{out}' holds a finished run.*--overwrite_output_dir"):
        check_output_dir(args)

    again = run_args(tmp_path, overwrite_output_dir=True)
    check_output_dir(again)
    part = prepare_partial(again)
    open(os.path.join(part, "metrics.jsonl"), "w").write('{"new": 1}\n')
    # While the new run trains, the finished one is untouched.
    assert open(os.path.join(out, "metrics.jsonl")).read() == '{"old": 1}\n'
    open(os.path.join(part, "config.json"), "w").write("new")
    finish_output_dir(again, {"step": "sft"})
    assert open(os.path.join(out, "config.json")).read() == "new"
    assert open(os.path.join(out, "metrics.jsonl")).read() == '{"new": 1}\n'
    assert open(os.path.join(out, "metrics.previous.jsonl")).read() == '{"old": 1}\n'
    assert not os.path.exists(partial_dir(out)) and not os.path.exists(out + ".replaced")


def test_partial_run_needs_resume_or_overwrite_and_keeps_its_metrics(tmp_path):
    args = run_args(tmp_path)
    part = prepare_partial(args)
    open(os.path.join(part, "metrics.jsonl"), "w").write('{"killed": 1}\n')
    with pytest.raises(UserError, match=r"unfinished run.*--resume.*--overwrite_output_dir"):
        check_output_dir(args)
    check_output_dir(run_args(tmp_path, resume=True))
    assert prepare_partial(run_args(tmp_path, resume=True)) == part
    assert open(os.path.join(part, "metrics.jsonl")).read() == '{"killed": 1}\n'  # a resume appends
    fresh = run_args(tmp_path, overwrite_output_dir=True)
    check_output_dir(fresh)
    prepare_partial(fresh)
    assert not os.path.exists(os.path.join(part, "metrics.jsonl"))
    assert open(os.path.join(part, "metrics.previous.jsonl")).read() == '{"killed": 1}\n'


def test_other_files_in_the_output_dir_are_refused(tmp_path):
    args = run_args(tmp_path)
    os.makedirs(args.output_dir)
    check_output_dir(args)  # an empty directory is fine
    open(os.path.join(args.output_dir, "notes.txt"), "w").write("mine")
    with pytest.raises(UserError, match="not empty and holds no finished run"):
        check_output_dir(args)


def test_fingerprint_names_the_input_that_changed(tmp_path):
    args = run_args(tmp_path)
    old = json.loads(json.dumps(fingerprint(args)))  # as stored in done.json
    assert first_difference(old, fingerprint(args)) is None
    assert first_difference(old, fingerprint(run_args(tmp_path, log_interval=1))) is None  # bookkeeping only
    assert "--learning_rate 0.001 -> 0.01" in first_difference(old, fingerprint(run_args(tmp_path, learning_rate=1e-2)))
    assert first_difference(old, fingerprint(run_args(tmp_path, per_device_train_batch_size=4)),
                            ignore={"per_device_train_batch_size"}) is None
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "bb"}\n')
    assert f"data file {data} changed (size 33 -> 34 bytes" in first_difference(old, fingerprint(args))
    data.write_text('{"prompt": "a", "response": "c"}\n')  # same size, other content
    assert f"data file {data} changed" in first_difference(old, fingerprint(args))
    data.write_text('{"prompt": "a", "response": "b"}\n')
    os.utime(data, ns=(1, 1))  # the same content, touched: the same input
    assert first_difference(old, fingerprint(args)) is None
    old = json.loads(json.dumps(fingerprint(args)))
    (tmp_path / "model" / "model.safetensors").write_bytes(b"y" * 11)
    assert "--model_name_or_path" in first_difference(old, fingerprint(args)) and "model.safetensors changed" in \
        first_difference(old, fingerprint(args))


def test_fingerprint_sees_tokenizers_dataset_dirs_and_reward_code_and_not_a_copy(tmp_path):
    """The inputs a rerun used to miss (a tokenizer file, a dataset directory's rows, a reward function's
    code) are compared by content; a model copied elsewhere (a copied WORK_DIR) is the same input."""
    import shutil

    model = tmp_path / "model"
    run_args(tmp_path)
    (model / "tokenizer_config.json").write_text('{"chat_template": "A"}')
    ds = tmp_path / "ds"
    (ds / "train").mkdir(parents=True)
    (ds / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (ds / "train" / "data-00000-of-00001.arrow").write_bytes(b"rows-1")
    code = tmp_path / "rf.py"
    code.write_text("def r(**kw): return [0.0]\n")
    args = run_args(tmp_path, data_path=[f"{ds}:train"], reward_funcs=[f"{code}:r"])
    old = json.loads(json.dumps(fingerprint(args)))
    assert old["version"] == 2 and first_difference(old, fingerprint(args)) is None

    (model / "tokenizer_config.json").write_text('{"chat_template": "B"}')
    assert "tokenizer_config.json changed" in first_difference(old, fingerprint(args))
    (model / "tokenizer_config.json").write_text('{"chat_template": "A"}')
    (ds / "train" / "data-00000-of-00001.arrow").write_bytes(b"rows-2")
    assert f"data directory {ds}:train: train/data-00000-of-00001.arrow changed" in first_difference(
        old, fingerprint(args))
    (ds / "train" / "data-00000-of-00001.arrow").write_bytes(b"rows-1")
    code.write_text("def r(**kw): return [1.0]\n")
    assert f"--reward_funcs {code}:r: its code changed" in first_difference(old, fingerprint(args))
    code.write_text("def r(**kw): return [0.0]\n")
    assert first_difference(old, fingerprint(args)) is None

    shutil.copytree(model, tmp_path / "copy")  # new mtimes and another path, the same files
    assert first_difference(old, fingerprint(run_args(tmp_path, data_path=[f"{ds}:train"], reward_funcs=[
        f"{code}:r"], model_name_or_path=str(tmp_path / "copy")))) is None


def test_fingerprint_of_an_earlier_version_still_matches(tmp_path):
    """done.json written before content digests ([size, mtime], fewer model files, a dataset directory
    by name) matches the same unchanged inputs, so an upgrade does not make every finished step 'changed'."""
    args = run_args(tmp_path)
    (tmp_path / "model" / "tokenizer.json").write_text("{}")
    now = fingerprint(args)
    v1 = json.loads(json.dumps(now))
    del v1["version"], v1["code"]
    v1["models"]["model_name_or_path"]["files"] = {
        n: sig[:2] for n, sig in v1["models"]["model_name_or_path"]["files"].items() if n != "tokenizer.json"}
    v1["data"] = {p: sig[:2] for p, sig in v1["data"].items()}
    assert first_difference(v1, now) is None
    v1["data"] = {p: [sig[0], sig[1] + 1] for p, sig in v1["data"].items()}  # v1 compares the mtime
    assert "changed" in first_difference(v1, now)


def test_status_for_launch_scripts(tmp_path):
    args = run_args(tmp_path)
    assert status(args)[0] == 1
    finished_run(args)
    code, msg = status(args)
    assert code == 0 and "complete for these inputs" in msg
    code, msg = status(run_args(tmp_path, learning_rate=0.5))
    assert code == 3 and "--learning_rate 0.001 -> 0.5" in msg


def test_status_continues_a_stopped_rerun_of_changed_inputs(tmp_path):
    """FORCE=1 reran a step whose inputs changed and was stopped; the next FORCE=1 run started it over
    (status said 'changed' from the finished run's done.json before looking at the stopped one)."""
    args = run_args(tmp_path)
    finished_run(args)
    new = run_args(tmp_path, learning_rate=0.5, resume=True, overwrite_output_dir=True)
    os.makedirs(os.path.join(partial_dir(new.output_dir), "checkpoints", "step-7"))
    with open(os.path.join(partial_dir(new.output_dir), "checkpoints", "step-7", "meta.json"), "w") as f:
        json.dump({"step": 7, "inputs": fingerprint(new)}, f)
    code, msg = status(run_args(tmp_path, learning_rate=0.5))
    assert code == 4 and "unfinished run of these inputs at step 7" in msg, msg
    assert status(run_args(tmp_path, learning_rate=0.7))[0] == 3  # neither the finished nor the stopped run
    check_output_dir(new)  # --resume --overwrite_output_dir: what pipeline.sh passes for 4


def test_step_stream_position_is_world_size_independent(monkeypatch):
    """A position saved under 2 ranks x 4 x 2 accumulation resumes at the same next samples under
    1 rank x 16 and 4 ranks x 2 x 2 (global batch 16), also across an epoch boundary; another global
    batch is refused."""
    from utils import ds
    from utils.stream import StepStream

    items = list(range(37))

    def global_steps(world, bs, ga, steps, state=None):
        streams = []
        for rank in range(world):
            monkeypatch.setattr(ds, "world_size", lambda: world)
            monkeypatch.setattr(ds, "rank", lambda r=rank: r)
            st = StepStream(items, bs, ga, list, seed=5)
            if state is not None:
                st.load_state_dict(state)
            streams.append(st)
        out = [sorted(x for st in streams for mb in st.next_step() for x in mb) for _ in range(steps)]
        return out, streams[0].state_dict()

    ref, _ = global_steps(1, 16, 1, 8)
    first, state = global_steps(2, 4, 2, 4)
    assert first == ref[:4]
    assert global_steps(1, 16, 1, 4, state)[0] == ref[4:]
    assert global_steps(4, 2, 2, 4, state)[0] == ref[4:]
    with pytest.raises(UserError, match="global batch of 16 samples, now it is 8"):
        global_steps(1, 8, 1, 1, state)


def test_signal_is_deferred_once_training_runs(tmp_path):
    """Before the loop a signal ends the process at once with 143; once deferred it is only recorded."""
    code = ("import os, signal, sys, time\n"
            "from utils import signals\n"
            "signals.install(on_exit=lambda: print('cleaned', flush=True))\n"
            "if sys.argv[1] == 'defer':\n"
            "    signals.defer()\n"
            "print('ready', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "time.sleep(0.2)\n"
            "print('request', signals.request(), flush=True)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    early = subprocess.run([sys.executable, "-c", code, "now"], env=env, capture_output=True, text=True)
    assert early.returncode == signals.STOP_EXIT_CODE and "cleaned" in early.stdout and "request" not in early.stdout
    late = subprocess.run([sys.executable, "-c", code, "defer"], env=env, capture_output=True, text=True)
    assert late.returncode == 0 and "request received SIGUSR1" in late.stdout


def test_a_watched_launcher_that_exits_is_a_stop_request(monkeypatch):
    import psutil

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        monkeypatch.setattr(signals._STATE, "watched", [psutil.Process(child.pid)])
        monkeypatch.setattr(signals._STATE, "request", None)
        assert signals.request() is None
        child.send_signal(signal.SIGKILL)
        time.sleep(0.2)  # a zombie until reaped below: already counts as gone
        assert signals.request() == f"saw its launcher (pid {child.pid}) exit"
    finally:
        child.kill()
        child.wait()


def test_a_directory_another_run_is_writing_is_refused(tmp_path, monkeypatch):
    """Two runs into one --output_dir: the second used to pass the checks (the first one's partial directory
    appears only after its model has loaded) and both wrote one metrics.jsonl. Rank 0 of a run holds a lock
    for the directory until it exits; the lock goes with the process, even killed."""
    from utils import output

    import tempfile

    out = str(tmp_path / "out")
    # Each job its own TMPDIR, as schedulers set it: the lock is per machine all the same (two jobs with
    # different TMPDIRs each took "the" lock when it lived there).
    for job in ("tmp1", "tmp2"):
        (tmp_path / job).mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from utils.output import lock_output_dir; "
                               f"lock_output_dir({out!r}); print('locked', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, TMPDIR=str(tmp_path / "tmp1")))
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(output, "_LOCK", None)
        monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp2"))
        monkeypatch.setattr(tempfile, "tempdir", None)
        with pytest.raises(UserError, match=rf"--output_dir '.*out' is being written by another run \(pid {holder.pid} "):
            check_output_dir(run_args(tmp_path))
        monkeypatch.setenv("RANK", "1")
        check_output_dir(run_args(tmp_path))  # other ranks leave the lock to rank 0
        monkeypatch.delenv("RANK")
    finally:
        holder.kill()
        holder.wait()
    check_output_dir(run_args(tmp_path))  # the killed run's lock is gone
    output._LOCK.close()


def test_output_lock_works_for_every_user_of_the_machine(tmp_path, monkeypatch):
    """The first user's run made /tmp/ds-rlhf-locks 0755 and every other user's run then ended in a
    PermissionError traceback. The folder is sticky and world-writable; another user's lock file (simulated:
    opening it for writing is denied) still refuses a busy directory; without it this user's own folder."""
    import builtins

    from utils import output
    from utils.output import lock_output_dir

    monkeypatch.setattr(output, "LOCK_ROOT", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(output, "_LOCK", None)
    out = str(tmp_path / "out")
    lock_output_dir(out)
    first = output._LOCK
    assert os.stat(tmp_path / "ds-rlhf-locks").st_mode & 0o7777 == 0o1777

    def other_users(path, mode="r", *a, **k):  # root may open anything: deny what another user may not
        if "ds-rlhf-locks" + os.sep in str(path) and mode != "r":
            raise PermissionError(13, "Permission denied", path)
        return builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(output, "open", other_users, raising=False)
    monkeypatch.setattr(output, "_LOCK", None)
    with pytest.raises(UserError, match=rf"is being written by another run \(pid {os.getpid()} "):
        lock_output_dir(out)  # the lock file is another user's: read-only handle, busy all the same
    first.close()
    monkeypatch.setattr(output, "_LOCK", None)
    lock_output_dir(out)  # free now: locked read-only
    output._LOCK.close()
    monkeypatch.setattr(output, "_LOCK", None)
    lock_output_dir(str(tmp_path / "new"))  # no lock file yet and the folder not writable: this user's own
    assert output._LOCK.name.startswith(str(tmp_path / f"ds-rlhf-locks-{os.getuid()}"))
    output._LOCK.close()
