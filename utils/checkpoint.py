"""Resumable checkpoints for every step: written atomically (periodically and when the run is asked to
stop), found, and loaded back, also on another world size or ZeRO stage.

Layout: OUTPUT_DIR.partial/checkpoints/step-N/ holds one DeepSpeed checkpoint per engine (tag = its
name: model, actor, critic) and meta.json (step, world size, ZeRO stages, the inputs' fingerprint).
The client state of the first engine's files carries the RNG states of every rank and whatever the
loop passes (data position, KL controller, ...).

A checkpoint written on another world size or ZeRO stage (1-3) is converted once, on rank 0, with
DeepSpeed's universal-checkpoint converter (deepspeed.checkpoint.ds_to_universal) into
step-N/<name>.universal and loaded with the engine's universal loader, which re-partitions the fp32
weights and Adam moments for the new ranks. ZeRO-0 checkpoints hold the whole optimizer and load on
any world size directly; between ZeRO-0 and ZeRO-1/2/3 there is no conversion, and DeepSpeed's
conversion of a ZeRO-3 checkpoint keeps no per-parameter Adam step for ZeRO-1/2 (both refused).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import sys
from argparse import Namespace
from pickle import UnpicklingError  # what torch.load(weights_only=True) raises; nothing is unpickled here

import numpy as np
import torch

from . import ds, signals
from .errors import UserError, lost_peer
from .output import SPLIT, first_difference, fingerprint, partial_dir
from .stream import check_resumable

META = "meta.json"


# ----------------------------------------------------------------------------- RNG and safe loading

def _rng_state() -> dict:
    """Every generator a step draws from, as tensors and plain Python data (loadable with weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # sampling in PPO generation draws from the device's generator
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _allowed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _safe_load(path, map_location=None, **_ignored):
    """torch.load(weights_only=True) with DeepSpeed's four checkpoint classes allowed by name.

    DeepSpeed's loaders (engine, universal converter and loader) unpickle anything
    (`weights_only=False`), so resuming from a tampered checkpoint could run code. Its files hold
    tensors and plain data plus the ZeRO stage enum, the loss scalers and ZeRO-1/2's parameter-slice
    addresses; anything else is refused with an error naming it, before it can run."""
    moment = _fresh_moment(path)
    if moment is not None:
        return moment
    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            loaded = _TORCH_LOAD(path, map_location=map_location, weights_only=True)
        except UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            raise UserError(f"--resume: '{path}' holds {found.group(1) if found else 'an object'}, which is "
                            "neither a tensor nor plain data; it is not loaded") from None
    if os.path.basename(path) == "optimizer_state.pt" and "optimizer_state_dict" not in loaded:
        _add_stage3_view(loaded, os.path.dirname(path))
    return loaded


def _add_stage3_view(optim_sd: dict, zero_dir: str) -> None:
    """A universal checkpoint converted from ZeRO-1/2 keeps Adam's step count in each parameter's
    step.pt and its hyperparameters under "param_groups"; DeepSpeed's ZeRO-3 universal loader reads
    both from "optimizer_state_dict" (as its own converter writes them). Provide that view in memory.
    An optimizer that has not stepped yet (PPO's actor during the critic warm-up) has no step.pt: step 0,
    a fresh optimizer's count (a StopIteration before)."""
    step = next((_safe_load(os.path.join(zero_dir, d, "step.pt")) for d in sorted(os.listdir(zero_dir))
                 if os.path.isfile(os.path.join(zero_dir, d, "step.pt"))), torch.tensor(0.0))
    optim_sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": optim_sd["param_groups"]}


def _fresh_moment(path: str):
    """Adam's moments of a parameter whose optimizer has not stepped yet, which its universal conversion
    leaves out (fp32.pt only): zeros, what a fresh Adam holds, so the first update is a fresh optimizer's.
    DeepSpeed's ZeRO-3 universal loader opens exp_avg.pt and exp_avg_sq.pt by name (a missing file
    before). None for any other path."""
    folder, name = os.path.split(path)
    fp32 = os.path.join(folder, "fp32.pt")
    if name not in ("exp_avg.pt", "exp_avg_sq.pt") or os.path.exists(path) or not os.path.isfile(fp32):
        return None
    weights = _safe_load(fp32)
    return dict(weights, param=torch.zeros_like(weights["param"]))


_TORCH_LOAD = torch.load


def _weights_only_loader(engine) -> None:
    """Make `engine.load_checkpoint` read its files with `_safe_load`."""
    engine.checkpoint_engine.load = _safe_load


@contextlib.contextmanager
def _only_safe_torch_load():
    """Every torch.load inside (DeepSpeed's universal converter and loader call it directly) goes
    through `_safe_load`."""
    torch.load = _safe_load
    try:
        yield
    finally:
        torch.load = _TORCH_LOAD


# ----------------------------------------------------------------------------- save / find / load

def checkpoint_root(output_dir: str) -> str:
    return os.path.join(partial_dir(output_dir), "checkpoints")


def _steps(root: str) -> list[str]:
    done = [d for d in os.listdir(root) if re.fullmatch(r"step-\d+", d)] if os.path.isdir(root) else []
    return sorted(done, key=lambda d: int(d.split("-")[1]))


def latest_checkpoint(root: str) -> str | None:
    done = _steps(root)
    return os.path.join(root, done[-1]) if done else None


def latest_meta(run_dir: str) -> dict | None:
    """meta.json of the newest complete checkpoint of a (partial) run directory, or None."""
    ckpt = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if ckpt is None or not os.path.isfile(os.path.join(ckpt, META)):
        return None
    with open(os.path.join(ckpt, META)) as f:
        return json.load(f)


def _stages(engines: dict) -> dict:
    return {name: int(e.zero_optimization_stage()) for name, e in engines.items()}


def save_checkpoint(root: str, step: int, engines: dict, client_state: dict, keep: int, meta: dict) -> str:
    """Engines' model/optimizer/scheduler states + client state + meta.json, written under a temporary
    name and renamed once every rank has finished, so a kill never leaves a half checkpoint (pitfall 19).
    Returns the checkpoint's path.

    A write that the file system refuses (a full disk, a file-size limit) does not end the rank inside
    DeepSpeed's save: the rank writes nothing more and goes on through the save's collectives, then the
    ranks agree, and every rank raises the first refusal's message (printed once, by rank 0). A rank that
    ended at once used to race its peers: the launcher killed them, with or without their own line."""
    tmp, final = os.path.join(root, f"tmp-step-{step}"), os.path.join(root, f"step-{step}")
    if ds.is_rank0():  # before any rank writes: a killed save's files must not end up in this one
        sweep_unfinished(root)
    ds.barrier()
    state = dict(client_state, step=step, rng=ds.all_gather_objects(_rng_state()))
    refused = []
    try:
        with _refusals_recorded(engines, refused):
            for name, engine in engines.items():
                engine.save_checkpoint(tmp, tag=name, client_state=state, save_latest=False)
    except BaseException as e:
        # Raised outside a checkpoint file's write: this rank left the save's collectives, so it ends now.
        # A refused write leaves no half checkpoint to fill the disk further; the complete earlier ones stay.
        shutil.rmtree(tmp, ignore_errors=True)
        if _write_failed(e):
            raise _write_error(root, final, _reason(e)) from None
        raise
    why = [w for w in ds.all_gather_objects(_reason(refused[0]) if refused else None) if w]
    if why:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(root, final, why[0], every_rank=True)
    ds.barrier()
    if ds.is_rank0():
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({**meta, "step": step, "world_size": ds.world_size(), "zero_stage": _stages(engines)}, f,
                      indent=2, sort_keys=True)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = _steps(root)
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, old))
    ds.barrier()
    return final


def sweep_unfinished(root: str) -> None:
    """Remove the `tmp-step-N` directories a killed save left under `root` (one save runs at a time, so
    every one there is stale). Left, a later save of the same step wrote into it and renamed it complete
    with the killed save's truncated rank files inside (a resume then failed reading them), and the
    others travelled into the finished OUTPUT_DIR/checkpoints, outside --save_total_limit."""
    if os.path.isdir(root):
        for d in os.listdir(root):
            if re.fullmatch(r"tmp-step-\d+", d):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)


@contextlib.contextmanager
def _refusals_recorded(engines: dict, refused: list):
    """Each engine's checkpoint-file writes record a refused write in `refused` instead of raising it;
    after one, this rank's later writes are skipped."""
    saved = {}
    for name, engine in engines.items():
        ce = getattr(engine, "checkpoint_engine", None)
        if ce is None or not callable(getattr(ce, "save", None)):
            continue
        saved[name] = vars(ce).get("save")

        def save(state_dict, path, _save=ce.save):
            if refused:
                return
            try:
                _save(state_dict, path)
            except BaseException as e:
                if not _write_failed(e):
                    raise
                refused.append(e)

        ce.save = save
    try:
        yield
    finally:
        for name, fn in saved.items():
            ce = engines[name].checkpoint_engine
            if fn is None:
                del ce.save  # the class's method again
            else:
                ce.save = fn


def _reason(e: BaseException) -> str:
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not isinstance(e, OSError):  # torch's stream writer says only that the file came out short
        why = f"the file came out short, as on a full disk or over a file-size limit ({why})"
    return why


def _write_error(root: str, final: str, why: str, every_rank: bool = False) -> UserError:
    earlier = _steps(root)
    denied = any(m in why for m in ("Permission denied", "Operation not permitted", "Read-only file system"))
    fix = f"make '{root}' writable" if denied else "free space"
    return UserError(f"could not write checkpoint '{final}': {why}; {fix} "
                     "and rerun with --resume (it continues from "
                     + (f"'{os.path.join(root, earlier[-1])}')" if earlier else "step 0: no earlier checkpoint)"),
                     every_rank=every_rank)


def _write_failed(e: BaseException) -> bool:
    """A checkpoint write that the file system refused: OSError (no space, a file-size limit, a read-only
    disk), or torch.save's RuntimeError for the same (its stream writer's position or write check)."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and not lost_peer(e) and any(
        m in text for m in ("inline_container", "PytorchStreamWriter", "file write failed"))


def load_checkpoint(path: str, engines: dict) -> dict:
    """Restore engines and this rank's RNG states; returns the client state (step, data position, ...).
    A checkpoint from another world size or ZeRO stage goes through the universal checkpoint."""
    meta = {}
    if os.path.isfile(os.path.join(path, META)):
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    saved_world, saved_stage = meta.get("world_size", ds.world_size()), meta.get("zero_stage", {})
    state = None
    for name, engine in engines.items():
        stage, was = int(engine.zero_optimization_stage()), saved_stage.get(name, int(engine.zero_optimization_stage()))
        universal = stage != was or (stage > 0 and saved_world != ds.world_size())
        if universal and (0 in (stage, was) or (was == 3 and stage < 3)):
            raise UserError(f"--resume: checkpoint '{path}' was written under ZeRO-{was} for '{name}' and this run "
                            f"uses ZeRO-{stage}; ZeRO-0 checkpoints resume under ZeRO-0, ZeRO-1/2 checkpoints under "
                            "ZeRO-1/2/3 and ZeRO-3 checkpoints under ZeRO-3 (each on any world size)")
        tag = _universal(path, name) if universal else name
        _weights_only_loader(engine)
        # DeepSpeed's ZeRO-3 universal loader gives every parameter group the hyperparameters of the
        # first one; the groups differ in weight decay (none on biases and norms), so keep ours.
        decay = [g["weight_decay"] for g in engine.optimizer.optimizer.param_groups] if universal else None
        engine._config.load_universal_checkpoint = universal  # read only by load_checkpoint (engine.py)
        try:
            with _only_safe_torch_load():
                _, loaded = engine.load_checkpoint(path, tag=tag)
        finally:
            engine._config.load_universal_checkpoint = False
        if decay is not None:
            for g, wd in zip(engine.optimizer.optimizer.param_groups, decay):
                g["weight_decay"] = wd
            # It also hands one step tensor to every group's state; torch's Adam increments it in place,
            # so shared it would count one step per group per optimizer step.
            for st in engine.optimizer.optimizer.state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].clone()
        if loaded is None:
            raise UserError(f"--resume: checkpoint '{path}' has no state for '{name}'")
        _complete_param_groups(engine)
        state = loaded  # the last engine's: under ZeRO-3 each rank's own (PPO keeps EMA shards there)
    # A rank beyond the saved world size continues the stream of rank (r mod saved world size):
    # sampling and dropout draws then differ from any uninterrupted run, which has other shards anyway.
    _set_rng_state(state["rng"][ds.rank() % len(state["rng"])])
    return dict(state, saved_world_size=saved_world, saved_zero_stage=saved_stage)


def _complete_param_groups(engine) -> None:
    """A checkpoint written with another optimizer class (torch's AdamW without --offload, DeepSpeedCPUAdam
    with it) restores param groups without the keys this one reads (CPUAdam's `bias_correction`: a
    KeyError at the first step); they get this optimizer's defaults, which are the run's settings. Adam's
    step count also goes back to the type this optimizer keeps it in."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    defaults = getattr(base, "defaults", {})
    for group in getattr(base, "param_groups", []):
        for key, value in defaults.items():
            group.setdefault(key, value)
    cpu_adam = type(base).__name__ == "DeepSpeedCPUAdam"
    for st in getattr(base, "state", {}).values():
        step = st.get("step") if isinstance(st, dict) else None
        if cpu_adam and torch.is_tensor(step):
            st["step"] = int(step.item())
        elif not cpu_adam and isinstance(step, (int, float)) and not isinstance(step, bool):
            st["step"] = torch.tensor(float(step))


def _universal(path: str, name: str) -> str:
    """Rank 0 converts step-N/<name> to step-N/<name>.universal once (atomically); returns the tag."""
    tag = f"{name}.universal"
    out = os.path.join(path, tag)
    if ds.is_rank0() and not os.path.isdir(out):
        from deepspeed.checkpoint import ds_to_universal

        tmp = out + ".tmp"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        conv = Namespace(input_folder=os.path.join(path, name), output_folder=tmp, num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with _only_safe_torch_load(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(conv)
        _alias_model_states(tmp)
        latest = os.path.join(path, "latest_universal")  # the converter points its parent folder at the result
        if os.path.isfile(latest):
            os.remove(latest)
        os.replace(tmp, out)
        print(f"converted {os.path.join(path, name)} to a universal checkpoint for another world size or "
              "ZeRO stage", flush=True)
    ds.barrier()
    return tag


def _alias_model_states(folder: str) -> None:
    """The universal loader reads rank 0's model-states file (scheduler, step counters, client state),
    named `mp_rank_00_model_states.pt` under ZeRO-1/2 and `zero_pp_rank_0_mp_rank_00_model_states.pt`
    under ZeRO-3 depending on the *loading* engine; the converter copies the source's. Provide both."""
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    have = [n for n in names if os.path.isfile(os.path.join(folder, n))]
    if not have:
        raise UserError(f"--resume: '{folder}' has no model-states file after conversion")
    for n in names:
        if n not in have:
            shutil.copy2(os.path.join(folder, have[0]), os.path.join(folder, n))


# ----------------------------------------------------------------------------- the loop's one call

class Checkpointer:
    """What a training loop calls: `resume()` once before its first step and `after_step(step)` after
    every optimizer step.

    `state()` returns the loop's own client state (data position, ...) and `restore(state)` puts it back;
    both see the whole client state dict, which also holds "step" and "rng".
    """

    def __init__(self, args, engines: dict, logger, state, restore):
        self.args, self.engines, self.logger, self.state, self.restore = args, engines, logger, state, restore
        self.root = checkpoint_root(args.output_dir)

    def resume(self) -> int:
        """With --resume, restore the latest complete checkpoint and return its step (0 for a fresh
        start). Every trained engine is then put in train mode: a model comes out of `from_pretrained`
        in eval mode and a resumed run skips the first evaluation, which used to be what switched
        dropout back on (pitfall 21). args.json is written only now, after every check has passed."""
        step = 0
        if self.args.resume:
            ckpt = latest_checkpoint(self.root)
            if ckpt is None:
                self.logger.write(f"--resume: no checkpoint in {self.root}; starting from step 0")
            else:
                try:
                    self._check_inputs(ckpt)
                    state = load_checkpoint(ckpt, self.engines)
                    self.restore(state)
                except UserError as e:  # the same refusal on every rank (one shared checkpoint): printed once
                    raise UserError(str(e), every_rank=True) from None
                step = state["step"]
                self.logger.write(f"resumed from {ckpt} at step {step}")
                self.logger.advance(step)
        for engine in self.engines.values():
            engine.train()
        self.logger.write_args()
        signals.defer()
        if ds.any_rank(signals.request() is not None):  # a launcher that exited during start-up
            self._exit(step, None)
        return step

    def after_step(self, step: int) -> None:
        """The periodic checkpoint, and the stop all ranks agree on: one all_reduce per step."""
        stop = ds.any_rank(signals.request() is not None)
        path = None
        if stop or (self.args.save_interval and step % self.args.save_interval == 0):
            path = self.save(step)
        if stop:
            self._exit(step, path)

    def save(self, step: int) -> str:
        state = self.state()
        meta = {"inputs": fingerprint(self.args), "positions": _positions(state)}
        return save_checkpoint(self.root, step, self.engines, state, self.args.save_total_limit, meta)

    def _check_inputs(self, ckpt: str) -> None:
        """Refuse changed inputs or data positions this run cannot continue, before any model state is
        loaded or converted to the universal layout for another world size."""
        if not os.path.isfile(os.path.join(ckpt, META)):
            return
        with open(os.path.join(ckpt, META)) as f:
            meta = json.load(f)
        diff = first_difference(meta["inputs"], fingerprint(self.args), ignore=SPLIT)
        if diff:
            raise UserError(f"--resume: the inputs changed since checkpoint '{ckpt}': {diff}; resume with the "
                            "original inputs, or start over with --overwrite_output_dir (without --resume)")
        now = _positions(self.state())
        for name, saved in meta.get("positions", {}).items():
            if name in now:
                check_resumable(saved, now[name])


    def _exit(self, step: int, path: str | None) -> None:
        """Every rank agreed to stop: say why and how to go on, then end with STOP_EXIT_CODE."""
        reasons = ds.all_gather_objects(signals.request())
        rank, why = next((r, w) for r, w in enumerate(reasons) if w is not None)
        where = f"checkpoint {path}" if path else "no new checkpoint (no step was trained)"
        self.logger.write(f"stopped after step {step}: rank {rank} {why}; {where}")
        self.logger.write(f"resume with: {resume_command()}")
        self.logger.close()
        ds.finish(signals.STOP_EXIT_CODE)


def _positions(client_state: dict) -> dict:
    """The data streams' positions in a loop's client state (utils.stream.StepStream.state_dict)."""
    return {k: v for k, v in client_state.items() if isinstance(v, dict) and "global_batch" in v}


def resume_command() -> str:
    """This run's command line with --resume, as the user would type it (the launcher's --local_rank dropped)."""
    import shlex

    argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    if "--resume" not in argv:
        argv.append("--resume")
    main = getattr(sys.modules.get("__main__"), "__file__", None)  # absolute since Python 3.9, before any chdir
    argv[0] = main if main and os.path.basename(main) == os.path.basename(argv[0]) else os.path.abspath(argv[0])
    if os.environ.get("RLHF_CALLER_CWD"):  # started by launch/run.sh: paths are relative to the caller's directory
        return f"cd {shlex.quote(os.getcwd())} && " + _launcher_command(argv)
    return _launcher_command(argv)


def _launcher_command(argv: list) -> str:
    import shlex

    if "LOCAL_SIZE" in os.environ:  # started by DeepSpeed's launcher
        one_node = os.environ.get("CROSS_SIZE", "1") == "1"
        launcher = f"deepspeed --num_gpus {os.environ['LOCAL_SIZE']}" if one_node else "deepspeed [the same launcher flags]"
        return f"{launcher} {shlex.join(argv)}"
    return f"python {shlex.join(argv)}"
