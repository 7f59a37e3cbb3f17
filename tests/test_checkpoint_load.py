"""Resume reads checkpoints with torch.load(weights_only=True): DeepSpeed's own objects and our RNG
states load, anything else is refused before it can run."""
from __future__ import annotations

import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from utils.errors import UserError
from utils.checkpoint import _rng_state, _set_rng_state, _weights_only_loader


def safe_loader():
    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace())
    _weights_only_loader(engine)
    return engine.checkpoint_engine.load


def draws() -> tuple:
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_deepspeed_objects_and_rng_states_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    np.random.randn()  # a cached Gaussian is part of numpy's state
    rng = _rng_state()
    expected = draws()
    scaler = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False, raise_error_at_min_scale=True, dtype=torch.float16)
    path = str(tmp_path / "optim_states.pt")
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": scaler, "static": LossScaler(1.0),
                "state": {0: {"exp_avg": torch.ones(3)}}, "client": {"step": 7, "rng": [rng]}}, path)

    loaded = safe_loader()(path, map_location="cpu")
    assert loaded["zero_stage"] is ZeroStageEnum.weights
    assert loaded["loss_scaler"].__dict__ == scaler.__dict__ and loaded["static"].cur_scale == 1.0
    assert torch.equal(loaded["state"][0]["exp_avg"], torch.ones(3))
    draws()  # move every generator on, then restore from the loaded state
    _set_rng_state(loaded["client"]["rng"][0])
    assert draws() == expected


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_other_objects_are_refused_without_running(tmp_path):
    marker = str(tmp_path / "ran")
    path = str(tmp_path / "model_states.pt")
    torch.save({"module": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(UserError, match=r"model_states.pt' holds io.open, which is neither a tensor"):
        safe_loader()(path)
    assert not os.path.exists(marker)

    torch.save({"args": __import__("argparse").Namespace(lr=1.0)}, path)
    with pytest.raises(UserError, match="argparse.Namespace"):
        safe_loader()(path)


def test_deepspeeds_own_torch_load_calls_are_made_safe_too(tmp_path):
    """DeepSpeed's universal-checkpoint converter and loader call torch.load(weights_only=False) directly;
    while a checkpoint is converted or loaded those calls go through the same safe loader."""
    from utils.checkpoint import _TORCH_LOAD, _only_safe_torch_load

    marker = str(tmp_path / "ran")
    path = str(tmp_path / "optimizer_state.pt")
    torch.save({"param_groups": [], "payload": _RunsCode(marker)}, path)
    with _only_safe_torch_load():
        with pytest.raises(UserError, match="holds io.open"):
            torch.load(path, weights_only=False)
    assert not os.path.exists(marker)
    assert torch.load is _TORCH_LOAD  # restored afterwards


def test_a_failed_checkpoint_write_leaves_no_half_checkpoint(tmp_path):
    """A disk that fills during a periodic save left `tmp-step-N/` behind, beside the complete checkpoints;
    it is removed, the earlier checkpoint stays, and the run stops with one line that names the checkpoint
    to resume from."""
    from utils.checkpoint import save_checkpoint

    class FullDisk:
        def save_checkpoint(self, path, tag, client_state, save_latest):
            os.makedirs(os.path.join(path, tag))
            with open(os.path.join(path, tag, "part.pt"), "wb") as f:
                f.write(b"x" * 100)
            raise OSError(28, "No space left on device")

    from utils.errors import UserError

    (tmp_path / "step-5").mkdir()
    with pytest.raises(UserError, match=rf"could not write checkpoint '{tmp_path}/step-10': \[Errno 28\] No space "
                                        rf"left on device; free space and rerun with --resume \(it continues from "
                                        rf"'{tmp_path}/step-5'\)"):
        save_checkpoint(str(tmp_path), 10, {"model": FullDisk()}, {}, keep=2, meta={})
    assert sorted(os.listdir(tmp_path)) == ["step-5"]

    class Bug:
        def save_checkpoint(self, path, tag, client_state, save_latest):
            raise RuntimeError("a bug, not the disk")

    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        save_checkpoint(str(tmp_path), 10, {"model": Bug()}, {}, keep=2, meta={})


def test_a_refused_checkpoint_file_lets_the_rank_finish_the_save_then_every_rank_raises(tmp_path):
    """A refused write inside DeepSpeed's save (its checkpoint engine's `save`, as torch.save's short
    file): the rank used to raise there and exit while its peers were still writing, and the launcher
    killed them, sometimes before they printed. Now the rank writes nothing more, goes on to the save's
    collectives (here: the stub's second file and its end), and raises one every-rank error after them;
    the engine's own `save` is put back."""
    import types

    from utils.checkpoint import save_checkpoint
    from utils.errors import UserError

    class ShortFile:
        def __init__(self):
            self.checkpoint_engine = types.SimpleNamespace(save=self.write)
            self.writes, self.finished = [], False

        def write(self, state_dict, path):
            self.writes.append(os.path.basename(path))
            if path.endswith("optim.pt"):
                raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                                   "writing file data/3: file write failed")
            torch.save(state_dict, path)

        def save_checkpoint(self, path, tag, client_state, save_latest):
            os.makedirs(os.path.join(path, tag))
            for name in ("optim.pt", "model.pt"):
                self.checkpoint_engine.save(state_dict={}, path=os.path.join(path, tag, name))
            self.finished = True  # DeepSpeed's closing barrier

    engine, original = ShortFile(), None
    original = engine.checkpoint_engine.save
    with pytest.raises(UserError, match=r"could not write checkpoint '.*step-4': the file came out short, as on a "
                                        r"full disk or over a file-size limit \(.*file write failed\).*no earlier") as e:
        save_checkpoint(str(tmp_path), 4, {"model": engine}, {}, keep=2, meta={})
    assert e.value.every_rank
    assert engine.finished and engine.writes == ["optim.pt"], engine.writes  # nothing written after the refusal
    assert engine.checkpoint_engine.save == original
    assert os.listdir(tmp_path) == []


def test_the_printed_resume_command_works_from_anywhere(tmp_path, monkeypatch):
    """Under launch/run.sh the ranks start from the checkout with paths relative to the user's directory:
    the printed command named `step1_sft/main.py` relative to the checkout and the data relative to the
    user, so it ran from neither. It now names the script absolutely and changes to the user's directory."""
    import sys

    from utils.checkpoint import resume_command

    monkeypatch.setattr(sys, "argv", ["step1_sft/main.py", "--local_rank=0", "--data_path", "d.jsonl"])
    monkeypatch.setattr(sys.modules["__main__"], "__file__", "/repo/step1_sft/main.py", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setenv("CROSS_SIZE", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLHF_CALLER_CWD", str(tmp_path))
    assert resume_command() == (f"cd {tmp_path} && deepspeed --num_gpus 2 /repo/step1_sft/main.py --data_path d.jsonl "
                                "--resume")
    monkeypatch.delenv("RLHF_CALLER_CWD")
    monkeypatch.delenv("LOCAL_SIZE")
    assert resume_command() == "python /repo/step1_sft/main.py --data_path d.jsonl --resume"


def test_a_killed_saves_files_never_enter_a_later_checkpoint(tmp_path):
    """A save killed mid-write left tmp-step-10/ with a truncated rank file; a resumed run that reached step
    10 again wrote into it and renamed it complete, stale file inside (the next resume failed reading it),
    and a tmp-step-N of another step travelled into the finished output, outside --save_total_limit."""
    from utils.checkpoint import save_checkpoint

    class Writer:
        def zero_optimization_stage(self):
            return 2

        def save_checkpoint(self, path, tag, client_state, save_latest):
            os.makedirs(os.path.join(path, tag), exist_ok=True)
            torch.save({"x": 1}, os.path.join(path, tag, "zero_pp_rank_0_optim_states.pt"))

    stale = tmp_path / "tmp-step-10" / "model"
    stale.mkdir(parents=True)
    (stale / "zero_pp_rank_1_optim_states.pt").write_bytes(b"trunc")
    (tmp_path / "tmp-step-6").mkdir()
    save_checkpoint(str(tmp_path), 10, {"model": Writer()}, {}, keep=2, meta={})
    assert sorted(os.listdir(tmp_path)) == ["step-10"]
    assert sorted(os.listdir(tmp_path / "step-10" / "model")) == ["zero_pp_rank_0_optim_states.pt"]


def test_a_refused_write_names_the_fix_that_fits_the_refusal():
    from utils.checkpoint import _write_error

    assert "; free space and rerun" in str(_write_error("/o", "/o/step-4", "[Errno 28] No space left on device"))
    for why in ("[Errno 13] Permission denied: 'x'", "[Errno 1] Operation not permitted", "[Errno 30] Read-only file system"):
        assert "; make '/o' writable and rerun" in str(_write_error("/o", "/o/step-4", why))
