"""Everything that talks to DeepSpeed and torch.distributed: the rest of the code calls these helpers,
`engine.backward(loss)` and `engine.step()` only."""
from __future__ import annotations

import atexit
import glob
import logging
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from . import signals
from .errors import UserError


# ----------------------------------------------------------------------------- ranks

def extensions_dir() -> str:
    """Where DeepSpeed's JIT-built C++ ops (cpu_adam, shm_comm) go: TORCH_EXTENSIONS_DIR when set, else a
    folder of this environment (sys.prefix/torch_extensions, or a per-environment folder under
    ~/.cache/ds-rlhf when sys.prefix is read-only, or under the temporary directory when HOME is too),
    which is then set for this process and its children.

    torch's default, ~/.cache/torch_extensions/py311_cpu, depends only on the Python and CUDA versions, so
    every environment of a user shares it. Each process writes its environment's torch include paths and
    flags into the op's build.ninja (torch.utils.cpp_extension._write_ninja_file_and_build_library), and
    ninja rebuilds whenever that command changed: with two environments taking turns (a second venv with
    another torch build), every program start of either one recompiles the op, about a minute each. One
    folder per environment builds each op once.

    A shared read-only environment on nodes whose HOME is read-only (or over quota) ended every run in an
    OSError traceback from torch's build; an unwritable TORCH_EXTENSIONS_DIR did too. Both are one line now."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        path = os.environ["TORCH_EXTENSIONS_DIR"]
        if not _writable_dir(path):
            raise UserError(f"TORCH_EXTENSIONS_DIR '{path}' is not a writable directory (DeepSpeed builds its C++ "
                            "ops there): set it to one that is, or unset it")
        return path
    import hashlib
    import tempfile

    key = hashlib.sha1(f"{sys.prefix}|{torch.__file__}|{torch.__version__}".encode()).hexdigest()[:12]
    tried = [os.path.join(sys.prefix, "torch_extensions"),
             os.path.join(os.path.expanduser("~"), ".cache", "ds-rlhf", "torch_extensions", key),
             os.path.join(tempfile.gettempdir(), f"ds-rlhf-{os.getuid()}", "torch_extensions", key)]
    for path in tried:
        # The temporary directory is shared by every user: only a folder this user owns may hold the ops it loads.
        mine = not path.startswith(tempfile.gettempdir()) or _writable_dir(os.path.dirname(os.path.dirname(path))) \
            and os.stat(os.path.dirname(os.path.dirname(path))).st_uid == os.getuid()
        if mine and _writable_dir(path):
            os.environ["TORCH_EXTENSIONS_DIR"] = path
            return path
    raise UserError(f"no writable folder for DeepSpeed's C++ ops (tried {', '.join(tried)}): set "
                    "TORCH_EXTENSIONS_DIR to a writable directory")


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


# What DeepSpeed's init_distributed reads; with any of them missing it falls back to MPI discovery, which
# without mpi4py ended the run in a ModuleNotFoundError traceback (RANK exported, WORLD_SIZE not).
RENDEZVOUS_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Task counts that a scheduler or MPI launcher sets in each process it starts, without RANK.
TASK_COUNT_ENV = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launch_env_problem(env, devices: int = 0, mpi: bool = False) -> str | None:
    """Why the environment `env` cannot start this program's process group on a machine with `devices`
    visible GPUs (0: CPU), in one line naming what to change, or None. Without RANK a process runs alone
    (a one-process group; MASTER_ADDR or MASTER_PORT alone are fine); `srun -n 2 python main.py` (or
    mpirun) started two such processes, which trained as two independent 1-rank jobs into the same
    --output_dir (on two nodes; on one node the second was refused as "being written by another run").
    With `mpi` (mpi4py importable) DeepSpeed reads the ranks from MPI instead (its `--launcher openmpi` and
    `slurm` rely on that), so only LOCAL_RANK is checked then."""
    given = [k for k in ("RANK", "WORLD_SIZE") if k in env]
    if given or mpi:
        missing = [k for k in RENDEZVOUS_ENV if k not in env]
        if missing and not mpi:
            return (f"the environment sets {' and '.join(given)} but not {', '.join(missing)}: start the ranks "
                    "with deepspeed, torchrun or launch/run.sh (they set all five), or unset "
                    f"{' and '.join(given)} to run one process")
        local = env.get("LOCAL_RANK", "")
        if devices and local.isdigit() and int(local) >= devices:  # torch.cuda.set_device: a CUDA traceback
            return (f"LOCAL_RANK={local} but this process sees {devices} GPU(s) (CUDA_VISIBLE_DEVICES="
                    f"{env.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most {devices} ranks per node "
                    "(--num_gpus / NGPUS) or make every GPU visible to each rank")
        return None
    for key in TASK_COUNT_ENV:
        count = env.get(key, "")
        if count.isdigit() and int(count) > 1:
            return (f"{key}={count}: the launcher started {count} copies of this program but set no RANK, so each "
                    "would train alone into the same --output_dir; start one `deepspeed` per node (launch/run.sh "
                    "with NUM_NODES, NODE_RANK and MASTER_ADDR) or torchrun, or a single task (srun --ntasks 1) "
                    "for one process")
        if count.isdigit():
            return None  # the first count present is this step's (srun sets SLURM_STEP_NUM_TASKS)
    return None


def check_launch_env() -> None:
    """Refuse, before any file is touched or a lock taken, an environment that would not start the
    process group the user meant (see launch_env_problem)."""
    import importlib.util

    problem = launch_env_problem(os.environ, torch.cuda.device_count(), importlib.util.find_spec("mpi4py") is not None)
    if problem:
        raise UserError(problem)


def init_distributed(seed: int) -> tuple[int, int]:
    """Initialise the process group (works for `deepspeed` and plain `python`), seed everything.
    Returns (rank, world_size)."""
    extensions_dir()  # before DeepSpeed builds or loads its first op (shm_comm, at init_distributed on a CPU)
    import deepspeed

    # One process per core pair at most: oversubscribed CPU threads slow every rank down. An explicit
    # OMP_NUM_THREADS wins (on a machine shared with other jobs, 1 thread per process avoids threads
    # waiting for each other to be scheduled at every parallel region).
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not torch.cuda.is_available() and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if "RANK" not in os.environ:  # plain `python main.py`: a one-process group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(29500 + os.getpid() % 1000)))
    signals.install(on_exit=_remove_shm_buffers)  # before the shared-memory buffers exist
    with signals.default_actions(), signals.watching_launchers():  # the rendezvous blocks in C++, where a
        build_ops()  # Python handler never runs
        try:
            deepspeed.init_distributed(verbose=False)
        except dist.DistNetworkError as e:
            if "EADDRINUSE" not in str(e):
                raise
            # A second job on one machine with deepspeed's default port: rank 0 could not listen (a traceback).
            raise UserError(f"MASTER_PORT {os.environ['MASTER_PORT']} is in use on this machine (another job's "
                            "rendezvous): give this job another port (deepspeed --master_port P, MASTER_PORT=P for "
                            "launch/run.sh and torchrun)") from None
        except dist.DistStoreError as e:  # a rank or node that never came: one line, not gloo's traceback
            raise UserError(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} gave up waiting for the other "
                            f"ranks at MASTER_ADDR={os.environ['MASTER_ADDR']} MASTER_PORT={os.environ['MASTER_PORT']} "
                            f"({str(e).splitlines()[0]}): start every node (NODE_RANK 0..NUM_NODES-1) with the same "
                            "NUM_NODES, MASTER_ADDR and MASTER_PORT, node 0 reachable from the others") from None
    atexit.register(_remove_shm_buffers)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    set_seed(seed)
    return dist.get_rank(), dist.get_world_size()


def build_ops() -> None:
    """Build (or load) DeepSpeed's shared-memory op before the rendezvous, one process of this extensions
    folder at a time, after removing the build locks ("lock" files) that an interrupted build left.

    torch marks a build in progress with an empty `lock` file in the op's folder and every other process
    waits, silently and without end, until it is gone; a Ctrl-C (or kill) during the first build left it,
    and every later run of the environment hung at start-up. Our builds run under an flock of
    `.ds-rlhf-build.lock`, so while we hold it no build of ours is running and a `lock` file is stale."""
    import fcntl

    from deepspeed.comm.torch import build_shm_op

    ext = extensions_dir()
    with open(os.path.join(ext, ".ds-rlhf-build.lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released when the file closes, or the process ends
        for stale in glob.glob(os.path.join(ext, "*", "lock")):
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
        build_shm_op()


def finish(code: int = 0) -> None:
    """End a run that finished (or stopped, with `code`) on every rank: wait for all ranks, then leave
    without interpreter teardown.

    Tearing torch's gloo process group down at exit (in `destroy_process_group` or during interpreter
    finalisation) can kill a rank with SIGABRT ("terminate called without an active exception") after
    the run has trained and saved: the launcher then reports a failure and a chained pipeline stops.
    CI saw it twice in about 20 resumed 2-rank runs; torch has no fix (pytorch PR #179291 was abandoned).
    By now every file is written and closed, so each rank flushes its streams, removes its
    shared-memory buffers and ends with `os._exit(code)`."""
    barrier()
    leave(code)


def leave(code: int) -> None:
    """End this rank now, without interpreter teardown (see `finish`): flush the streams and the log
    handlers, remove the shared-memory buffers, `os._exit(code)`. Rank 0 also writes `code` to the file
    named by RLHF_RESULT_FILE (launch/run.sh reads it to tell a run that finished as a stop request
    arrived from one that stopped: the `deepspeed` command it signalled has no such code)."""
    result = os.environ.get("RLHF_RESULT_FILE")
    if result and rank() == 0:
        try:
            with open(result, "w") as f:
                f.write(str(code))
        except OSError:
            pass
    _remove_shm_buffers()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _remove_shm_buffers() -> None:
    """The buffers of every rank of this job on this machine, at exit (see remove_shm_buffers): by then
    all of them are mapped, and a rank that was killed (`kill -9`, an OOM kill) cannot remove its own."""
    remove_shm_buffers(os.environ.get("MASTER_PORT", ""), os.environ.get("MASTER_ADDR", ""))


def remove_shm_buffers(port, addr: str = "*", rank: str = "*") -> list[str]:
    """DeepSpeed's CPU shared-memory allreduce leaves its /dev/shm buffers (tens of MB per rank, named
    by address, port and rank) behind at exit; a machine running many jobs on fresh ports fills up.
    Removes those of `port` (of one address and rank, or all of them: what a launcher does after a run
    that was killed) and returns their paths. Unlinking is safe: a peer that still maps the file keeps
    its pages until it unmaps."""
    found = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}")
    for path in found:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return found


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def print0(*a) -> None:
    if is_rank0():
        print(*a, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values) -> torch.Tensor:
    """Sum a list of numbers over ranks (float64 on the accelerator); returns a CPU tensor."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t)
    return t.cpu()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (one all_reduce MAX of one number)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(obj) -> list:
    if not dist.is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- config

def ds_config(*, stage: int, offload: bool, dtype: str, micro_batch: int, grad_accum: int,
              world: int, grad_clip: float = 1.0, offload_params: bool = False) -> dict:
    """The DeepSpeed config for a trained model. The batch arithmetic is asserted here, once."""
    if micro_batch < 1 or grad_accum < 1:
        raise UserError("batch size and gradient accumulation steps must be >= 1")
    if offload_params and stage != 3:
        raise UserError("parameter offload needs ZeRO stage 3")
    if offload and stage == 0:  # it was silently ignored (args.json said offload: true)
        raise UserError("--offload moves the optimizer states to the CPU, which needs --zero_stage >= 1")
    train_batch = micro_batch * grad_accum * world
    zero = {"stage": stage, "overlap_comm": torch.cuda.is_available()}
    if stage >= 1 and offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=1e4, stage3_max_live_parameters=3e7,
                    stage3_prefetch_bucket_size=3e7, stage3_gather_16bit_weights_on_model_save=True)
        if offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero,
        "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                       "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    assert cfg["train_batch_size"] == (cfg["train_micro_batch_size_per_gpu"]
                                       * cfg["gradient_accumulation_steps"] * world)
    return cfg


def check_dtype(dtype: str) -> None:
    """A precision this machine's accelerator cannot train in, refused before any model loads (DeepSpeed
    raised it as a traceback once the model was loaded: fp16 on a CPU)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = {"fp16": acc.is_fp16_supported, "bf16": acc.is_bf16_supported}.get(dtype)
    if supported is not None and not supported():
        raise UserError(f"--dtype {dtype} is not supported on this machine's accelerator ({acc.device_name()}); "
                        f"use {'bf16 or ' if dtype == 'fp16' and acc.is_bf16_supported() else ''}fp32")


def ds_eval_config(*, stage: int, dtype: str, micro_batch: int, world: int, offload_params: bool = False) -> dict:
    """Config for a frozen model (reference, reward): ZeRO-3 shards it, parameter offload needs ZeRO-3."""
    if offload_params and stage != 3:
        raise UserError("offloading a frozen model's parameters needs ZeRO stage 3 for it; "
                        "pass --zero_stage 3 for that model or drop the offload flag")
    cfg = ds_config(stage=stage if stage == 3 else 0, offload=False, dtype=dtype, micro_batch=micro_batch,
                    grad_accum=1, world=world, offload_params=offload_params)
    return cfg


# ----------------------------------------------------------------------------- engines

def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ds_shape: under ZeRO-3 the parameter is already partitioned into a flat (1-D) shard.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model, lr: float, weight_decay: float, betas, offload: bool):
    groups = _param_groups(model, weight_decay)
    if not groups:
        raise UserError("the model has no trainable parameters")
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)
    if torch.cuda.is_available():
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, lr=lr, betas=betas, adam_w_mode=True)
    # CPU: torch's fused kernel (torch >= 2.4) makes one pass per tensor instead of ~10 small ops, which
    # on small models costs as much as the backward pass (it is also what HF Trainer picks by default).
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def build_scheduler(optimizer, kind: str, warmup: int, total_steps: int):
    """transformers' schedule `kind` after `warmup` linear steps. `constant` warms up too (transformers'
    own ignores the warm-up, so PPO's --num_warmup_steps did nothing); a warm-up as long as the run
    never reaches the learning rate the log announces, and is refused."""
    from transformers import get_scheduler

    if warmup and warmup >= total_steps:
        raise UserError(f"--num_warmup_steps {warmup} is not shorter than the run's {total_steps} optimizer steps: "
                        "the learning rate would never reach its peak")
    if kind == "constant" and warmup:
        kind = "constant_with_warmup"
    return get_scheduler(kind, optimizer=optimizer, num_warmup_steps=warmup,
                         num_training_steps=max(total_steps, 1))


def init_train_engine(model, *, cfg: dict, lr: float, weight_decay: float, betas, offload: bool,
                      scheduler: str, warmup: int, total_steps: int):
    import deepspeed

    opt = build_optimizer(model, lr, weight_decay, betas, offload and cfg["zero_optimization"]["stage"] > 0)
    sched = build_scheduler(opt, scheduler, warmup, total_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    if world_size() == 1 and cfg["zero_optimization"]["stage"] == 0:
        # One process, no ZeRO: DeepSpeed's gradient all-reduce flattens every gradient into a buffer,
        # "averages" it over one rank and copies it back, at every step (~7% of a tiny model's step);
        # without it the gradients, and so every number, are bit-for-bit the same.
        engine.enable_backward_allreduce = False
    return engine


def init_eval_engine(model, cfg: dict):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    return engine


# ----------------------------------------------------------------------------- full weights

def _is_zero3_param(p) -> bool:
    return hasattr(p, "ds_id")


def gather_state_dict(module: torch.nn.Module) -> dict | None:
    """The full state dict (parameters gathered one at a time under ZeRO-3, buffers included) on
    rank 0 as CPU tensors; None on other ranks. Every rank must call it (pitfall 17)."""
    import deepspeed

    out = {} if is_rank0() else None
    for name, p in module.named_parameters():
        if _is_zero3_param(p):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if out is not None:
                    out[name] = p.detach().cpu().clone()
        elif out is not None:
            out[name] = p.detach().cpu().clone()
    if out is not None:
        persistent = set(module.state_dict(keep_vars=True))  # skips non-persistent buffers (rotary caches)
        for name, b in module.named_buffers():
            if name in persistent:
                out[name] = b.detach().cpu().clone()
    return out
