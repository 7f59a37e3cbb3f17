"""Output directories that are never half-replaced (pitfall 24).

A run writes everything (args.json, metrics.jsonl, checkpoints/, its model) to the sibling
`OUTPUT_DIR.partial` while it trains. When the model is saved there, `done.json` (the fingerprint of
the run's inputs) is added and the directory is renamed to OUTPUT_DIR. So OUTPUT_DIR is always either
absent, the earlier finished run, or the new finished one; a killed run leaves its partial directory,
which `--resume` continues.

- A finished run in OUTPUT_DIR (or any non-empty OUTPUT_DIR) is replaced only with
  --overwrite_output_dir; it stays in place until the new run has finished, and its metrics.jsonl is
  then appended to the new directory's metrics.previous.jsonl.
- A partial run is continued with --resume or discarded with --overwrite_output_dir (its
  metrics.jsonl goes to the new partial directory's metrics.previous.jsonl).
- done.json records the inputs: every model directory (its config, weight, tokenizer and chat-template
  files), every data file and dataset directory, the source of `--reward_funcs`, each file by size and
  content digest, and the flags that change the result. `python -m utils.output status SCRIPT ARGS...`
  compares them with a new command line; launch/run.sh uses it to skip a finished step or name the
  input that changed.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time

from .errors import UserError

DONE = "done.json"
PARTIAL_SUFFIX = ".partial"
# Flags that change where or how often a run writes, not what it learns: not part of the fingerprint.
BOOKKEEPING = {"output_dir", "resume", "overwrite_output_dir", "local_rank", "config", "log_interval",
               "eval_interval", "save_interval", "save_total_limit", "enable_tensorboard", "tensorboard_path",
               "print_answers_interval"}
# How the work is split over ranks and computed, not what is computed: a resumed run may change these
# (another world size, another ZeRO stage, a cheaper forward); the data stream checks the global batch.
SPLIT = {"per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
         "zero_stage", "offload", "actor_zero_stage", "critic_zero_stage", "per_device_generation_batch_size",
         "per_device_training_batch_size", "generation_batches", "offload_reference_model",
         "offload_reward_model", "gradient_checkpointing", "actor_gradient_checkpointing",
         "critic_gradient_checkpointing", "shared_prompt_forward", "precompute_ref_logprobs",
         "attn_implementation"}
WEIGHTS = ("*.safetensors", "*.bin", "*.pt")


def partial_dir(output_dir: str) -> str:
    """Where a run writes until it has finished."""
    return os.path.normpath(output_dir) + PARTIAL_SUFFIX


def is_finished(path: str) -> bool:
    return os.path.isfile(os.path.join(path, DONE))


# ----------------------------------------------------------------------------- fingerprint

# A file's signature is [size, mtime_ns, digest]; two signatures match when size and content digest do,
# so a `touch`ed or copied file is the same input and an edited one is not. Files up to SAMPLED_ABOVE
# bytes (every data and code file a user edits by hand) are hashed whole; a larger weights file is
# identified by its size and 64 blocks spread over it (retrained weights differ everywhere). A digest is
# computed once per (path, size, mtime) in a process: a run saves a checkpoint's fingerprint often.
SAMPLED_ABOVE = 256 << 20
FINGERPRINT_VERSION = 2
MODEL_FILES = ("config.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
               "special_tokens_map.json", "added_tokens.json", "merges.txt")
_DIGESTS: dict = {}


def _digest(path: str, size: int, sample: bool) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if sample and size > SAMPLED_ABOVE:
            block = 1 << 16
            for i in range(64):
                f.seek((size - block) * i // 63)
                h.update(f.read(block))
            return "sampled:" + h.hexdigest()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_sig(path: str, sample: bool = False) -> list:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, sample)
    if key not in _DIGESTS:
        _DIGESTS[key] = _digest(path, st.st_size, sample)
    return [st.st_size, st.st_mtime_ns, _DIGESTS[key]]


def _same_file(was, now) -> bool:
    """Signatures of fingerprint version 2 compare size and digest; an older [size, mtime] one both."""
    if not (isinstance(was, list) and isinstance(now, list)):
        return was == now
    return was[:2] == now[:2] if len(was) == 2 else (was[0], was[2]) == (now[0], now[2])


def _model_sig(path: str) -> dict | str:
    """A model directory: its config, weights, tokenizer and chat-template files (by content, not path)."""
    from .model import TOKENIZER_FILES

    if not os.path.isdir(path):
        return path  # a hub name: the name is all we know without the network
    names = set(MODEL_FILES) | set(TOKENIZER_FILES)
    files = [os.path.join(path, n) for n in sorted(names)] + sorted(
        f for pat in WEIGHTS for f in glob.glob(os.path.join(path, pat)))
    return {"path": os.path.realpath(path),
            "files": {os.path.basename(f): _file_sig(f, sample=f.endswith(tuple(w[1:] for w in WEIGHTS)))
                      for f in files if os.path.isfile(f)}}


def _tree_sig(root: str) -> dict:
    """Every file under a dataset directory (a save_to_disk or hub-layout one), by relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for n in sorted(filenames):
            if not n.startswith(".") and not n.endswith(".lock"):
                f = os.path.join(dirpath, n)
                out[os.path.relpath(f, root)] = _file_sig(f)
    return out


def _data_sig(path: str):
    from .data import split_source

    source, _ = split_source(path)
    if os.path.isfile(source):
        return _file_sig(source)
    if os.path.isdir(source):
        return {"files": _tree_sig(source)}
    return "hub"


def _code_sig(spec: str):
    """A --reward_funcs entry's source file (FILE.py:NAME, or the module's file found without importing it)."""
    target = spec.rpartition(":")[0] or spec
    if target.endswith(".py"):
        return _file_sig(target) if os.path.isfile(target) else "missing"
    try:
        import importlib.util

        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        found = None
    origin = getattr(found, "origin", None)
    return _file_sig(origin) if origin and os.path.isfile(origin) else "module"


def fingerprint(args) -> dict:
    """The inputs of a run: models (config, weights, tokenizer), data files and directories, the code
    of rule-based rewards, and the result-changing flags."""
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in BOOKKEEPING}
    models = {k: _model_sig(v) for k, v in flags.items() if k.endswith("model_name_or_path") and v}
    data = {}
    for k, v in flags.items():
        if k.endswith("data_path") and v:
            for p in (v if isinstance(v, list) else [v]):
                data[p] = _data_sig(p)
    code = {spec: _code_sig(spec) for spec in (flags.get("reward_funcs") or [])}
    return {"version": FINGERPRINT_VERSION, "models": models, "data": data, "code": code, "flags": flags}


def _changed_files(was: dict, now: dict, old_style: bool) -> list[str]:
    names = set(was) if old_style else set(was) | set(now)  # version 1 recorded fewer files of a model
    return sorted(n for n in names if n not in was or n not in now or not _same_file(was[n], now[n]))


def first_difference(old: dict, new: dict, ignore=()) -> str | None:
    """A one-line description of the first input that differs between two fingerprints, or None.
    A model directory is compared by its files' contents, so a copied model (another path) is the same
    input; its path flag is then not compared either."""
    old_style = old.get("version", 1) < FINGERPRINT_VERSION
    same_model = set()
    for name, sig in new["models"].items():
        was = old["models"].get(name)
        if isinstance(sig, dict) and isinstance(was, dict):
            changed = _changed_files(was["files"], sig["files"], old_style)
            if changed:
                return f"--{name} {sig['path']}: {', '.join(changed)} changed"
            same_model.add(name)
        elif was != sig:
            return f"--{name}: {_show(was)} -> {_show(sig)}"
    for path in sorted(set(old["data"]) | set(new["data"])):
        was, now = old["data"].get(path), new["data"].get(path)
        if was is None or now is None:
            return f"data file {path} {'added' if was is None else 'removed'}"
        if isinstance(now, dict) and isinstance(was, dict):
            changed = _changed_files(was["files"], now["files"], False)
            if changed:
                return f"data directory {path}: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} changed"
        elif old_style and was == "hub":
            continue  # version 1 recorded a dataset directory as a name
        elif not _same_file(was, now):
            if isinstance(was, list) and isinstance(now, list):
                return f"data file {path} changed (size {was[0]} -> {now[0]} bytes, modified {_when(now)})"
            return f"data {path}: {_show(was)} -> {_show(now)}"
    for spec in sorted(set(old.get("code", {})) & set(new.get("code", {}))):
        if not _same_file(old["code"][spec], new["code"][spec]):
            return f"--reward_funcs {spec}: its code changed"
    for k in sorted(set(old["flags"]) | set(new["flags"])):
        if k in ignore or k in same_model:
            continue
        if old["flags"].get(k) != new["flags"].get(k):
            return f"--{k} {old['flags'].get(k)} -> {new['flags'].get(k)}"
    return None


def _show(sig) -> str:
    return sig["path"] if isinstance(sig, dict) else str(sig)


def _when(sig) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sig[1] / 1e9)) if isinstance(sig, list) else "?"


# ----------------------------------------------------------------------------- start and finish

_LOCK = None  # the open lock file of this process's --output_dir (held until the process ends)
LOCK_ROOT = "/tmp"  # where the machine-wide lock folder lives (tests point it elsewhere)


def lock_output_dir(output_dir: str) -> None:
    """Global rank 0 (or a single process): hold an exclusive lock for OUTPUT_DIR for the rest of the
    process, or refuse a directory another run on this machine is writing. Without it a second run into
    the same --output_dir passed the checks below (its partial directory appears only after the model has
    loaded) and both wrote one metrics.jsonl. The lock file lives in the temporary directory (named by a
    hash of the absolute path), so nothing is written beside the user's output; the OS drops the lock
    when the process ends, even by SIGKILL. Runs on different machines are not seen."""
    global _LOCK
    if os.environ.get("RANK", "0") != "0" or _LOCK is not None:
        return
    import fcntl
    import hashlib
    import socket
    import tempfile

    out = os.path.realpath(os.path.abspath(output_dir))
    # One place per machine, not the job's TMPDIR (a scheduler often gives every job its own): two jobs
    # with different TMPDIRs both took "the" lock and wrote one run directory.
    locks = os.path.join(LOCK_ROOT if os.access(LOCK_ROOT, os.W_OK) else tempfile.gettempdir(), "ds-rlhf-locks")
    f, writable = _open_lock(locks, hashlib.sha1(out.encode()).hexdigest()[:16] + ".lock")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"--output_dir '{output_dir}' is being written by another run ({holder}); wait for it to "
                        "finish or stop it, or choose another directory") from None
    if writable:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
    _LOCK = f


def _open_lock(locks: str, name: str):
    """The lock file `name` in the folder `locks`, shared by every user of the machine, and whether it is
    open for writing. The first user's folder was 0755 and every other user's run ended in a
    PermissionError traceback: the folder is now made sticky and world-writable (as /tmp); another user's
    lock file of the same directory is locked through a read-only handle (flock needs none); a folder an
    older version left unshared is replaced by this user's own."""
    try:
        os.makedirs(locks, exist_ok=True)
        if os.stat(locks).st_uid == os.getuid():
            os.chmod(locks, 0o1777)
        return open(os.path.join(locks, name), "a+"), True
    except PermissionError:
        pass
    try:
        return open(os.path.join(locks, name)), False
    except OSError:
        own = f"{locks}-{os.getuid()}"
        os.makedirs(own, exist_ok=True)
        return open(os.path.join(own, name), "a+"), True


def check_output_dir(args) -> None:
    """Refuse, before anything is written, to replace a finished run or a partial one without being
    asked, or a directory another run is writing (rank 0 takes its lock; the rest is read-only and
    every rank may call it)."""
    lock_output_dir(args.output_dir)
    out, part = os.path.normpath(args.output_dir), partial_dir(args.output_dir)
    overwrite = args.overwrite_output_dir
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        if is_finished(out):
            raise UserError(f"--output_dir '{out}' holds a finished run ({DONE}); pass --overwrite_output_dir "
                            "to replace it (the finished run stays until the new one has finished)")
        raise UserError(f"--output_dir '{out}' is not empty and holds no finished run of this project (no {DONE}); "
                        "pass --overwrite_output_dir to replace it, or choose another directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir '{out}' is a file")
    if is_finished(part) and not os.path.exists(out):
        raise UserError(f"'{part}' holds a finished run whose move to '{out}' was interrupted: rename it to '{out}'")
    if os.path.isdir(part) and not args.resume and not overwrite:
        raise UserError(f"'{part}' holds an unfinished run of --output_dir '{out}': pass --resume to continue it "
                        "from its last checkpoint, or --overwrite_output_dir to start over")


def prepare_partial(args) -> str:
    """Rank 0: create the partial directory (discarding an earlier one when starting over with
    --overwrite_output_dir, its metrics kept) and return it."""
    part = partial_dir(args.output_dir)
    if os.path.isdir(part) and not args.resume:  # check_output_dir allowed this only with --overwrite_output_dir
        old = os.path.join(part, "metrics.jsonl")
        kept = _read(old) if os.path.isfile(old) else ""
        kept = (_read(os.path.join(part, "metrics.previous.jsonl")) if os.path.isfile(
            os.path.join(part, "metrics.previous.jsonl")) else "") + kept
        shutil.rmtree(part)
        os.makedirs(part)
        if kept:
            with open(os.path.join(part, "metrics.previous.jsonl"), "w") as f:
                f.write(kept)
    os.makedirs(part, exist_ok=True)
    return part


def finish_output_dir(args, record: dict) -> None:
    """Rank 0, after the model is saved in the partial directory: write done.json and put the directory
    in place of OUTPUT_DIR. An earlier finished run there is replaced only now; its metrics.jsonl is
    appended to metrics.previous.jsonl."""
    out, part = os.path.normpath(args.output_dir), partial_dir(args.output_dir)
    from .checkpoint import sweep_unfinished  # (checkpoint imports this module)

    sweep_unfinished(os.path.join(part, "checkpoints"))
    with open(os.path.join(part, DONE + ".tmp"), "w") as f:
        json.dump({**record, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "inputs": fingerprint(args)}, f,
                  indent=2, sort_keys=True)
    os.replace(os.path.join(part, DONE + ".tmp"), os.path.join(part, DONE))
    if os.path.isdir(out) and os.listdir(out):
        previous = "".join(_read(os.path.join(out, n)) for n in ("metrics.previous.jsonl", "metrics.jsonl")
                           if os.path.isfile(os.path.join(out, n)))
        if previous:
            with open(os.path.join(part, "metrics.previous.jsonl"), "a") as f:
                f.write(previous)
        replaced = out + ".replaced"
        if os.path.exists(replaced):
            shutil.rmtree(replaced)
        os.rename(out, replaced)  # the next rename follows at once; between them OUTPUT_DIR is absent, never mixed
        os.rename(part, out)
        shutil.rmtree(replaced)
    else:
        try:
            if os.path.isdir(out):
                os.rmdir(out)  # empty
            os.rename(part, out)
        except OSError:  # OUTPUT_DIR is a mount point or on another file system: move the entries
            os.makedirs(out, exist_ok=True)
            for name in sorted(os.listdir(part), key=lambda n: n == DONE):  # done.json last
                shutil.move(os.path.join(part, name), os.path.join(out, name))
            os.rmdir(part)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


# ----------------------------------------------------------------------------- status (for launch/run.sh)

STATUS_DONE, STATUS_RUN, STATUS_CHANGED, STATUS_RESUME_CHANGED = 0, 1, 3, 4


def status(args) -> tuple[int, str]:
    """(code, message): STATUS_DONE when OUTPUT_DIR holds a finished run of exactly these inputs,
    STATUS_CHANGED (naming the input) when it, or a partial run to resume, was made from other inputs,
    STATUS_RESUME_CHANGED when the finished run is of other inputs and a stopped run of these inputs
    waits to be continued (it then replaces the finished one), else STATUS_RUN."""
    from .checkpoint import latest_meta

    out, now = os.path.normpath(args.output_dir), fingerprint(args)
    meta = latest_meta(partial_dir(out))
    if is_finished(out):
        with open(os.path.join(out, DONE)) as f:
            done = json.load(f)
        diff = first_difference(done.get("inputs", {"models": {}, "data": {}, "flags": {}}), now)
        if diff and meta is not None and first_difference(meta["inputs"], now, ignore=SPLIT) is None:
            # A rerun of changed inputs (FORCE=1) that was stopped: continue it, rather than start over.
            return STATUS_RESUME_CHANGED, (f"{out} was made from other inputs ({diff}); {partial_dir(out)} holds "
                                           f"an unfinished run of these inputs at step {meta['step']}")
        return (STATUS_CHANGED, f"{out} was made from other inputs: {diff}") if diff else (
            STATUS_DONE, f"{out} is complete for these inputs")
    if meta is not None:
        diff = first_difference(meta["inputs"], now, ignore=SPLIT)
        if diff:
            return STATUS_CHANGED, f"the unfinished run in {partial_dir(out)} was started from other inputs: {diff}"
        return STATUS_RUN, f"{partial_dir(out)} holds an unfinished run at step {meta['step']}"
    return STATUS_RUN, f"{out} has no finished run"


def main(argv=None) -> None:
    """python -m utils.output status SCRIPT ARGS...: prints one line, exits with the status code."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] != "status":
        print("usage: python -m utils.output status SCRIPT [ARGS...]", file=sys.stderr)
        sys.exit(2)
    import importlib

    module = os.path.normpath(argv[1]).removesuffix(".py").replace(os.sep, ".")
    parse_args = importlib.import_module(module).parse_args
    try:
        code, msg = status(parse_args(argv[2:]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(msg, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
