"""Stop requests: SIGTERM, SIGINT, SIGUSR1 and SIGHUP, and the death of the processes that launched a rank.

DeepSpeed's `deepspeed` command (launcher/runner.py) installs no signal handler on a single node (nor
with --no_ssh), so `kill <its pid>` ends it alone while its per-node launcher (launcher/launch.py) and
the ranks train on. launch.py, when signalled itself, sends SIGTERM to its ranks and SIGKILLs them 30 s
later. So a rank cannot rely on being told: it watches the launcher processes above it (and those
named in RLHF_WATCH_PIDS by launch/run.sh and launch/pipeline.sh) and treats their exit as a stop
request too (pitfall 23).

Before training starts (loading data and models) a signal ends the rank at once: there is nothing to
save. Once the loop runs (`defer()`), a signal only records the request; the loop finishes its optimizer
step, every rank agrees to stop at that step (utils.checkpoint.Checkpointer) and writes a checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

# 128 + SIGTERM, the status shells and schedulers read as "terminated": every stop request (any of the
# three signals or a launcher that went away) ends each rank with it once its checkpoint is written.
STOP_EXIT_CODE = 143
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
WATCH_ENV = "RLHF_WATCH_PIDS"  # "host:pid host:pid ...", set by launch/run.sh and launch/pipeline.sh


class _State:
    """Process-wide: a signal handler has nowhere else to write."""

    def __init__(self):
        self.request: str | None = None
        self.deferred = False
        self.watched: list = []  # psutil.Process of the launchers
        self.on_exit = None  # called before an immediate exit (removes shared-memory buffers)


_STATE = _State()


def install(on_exit=None) -> None:
    """Handle the stop signals and start watching this rank's launchers; called once per process.
    SIGHUP (a closed terminal, a dropped ssh session) stops the run the same way, unless the job was
    started to ignore it (`nohup`)."""
    _STATE.on_exit = on_exit
    _STATE.watched = _launchers()
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _handler)


@contextlib.contextmanager
def default_actions():
    """Inside, the stop signals take their default action (the process ends at once). For a blocking C++
    call such as the rendezvous of init_distributed, which retries its connect on EINTR: a Python handler
    runs only when the call returns, so a rank whose peer had already exited (a refused output directory)
    ignored the launcher's SIGTERM until its SIGKILL 30 s later."""
    sigs = [sig for sig in (*SIGNALS, signal.SIGHUP) if signal.getsignal(sig) is not signal.SIG_IGN]
    saved = {sig: signal.signal(sig, signal.SIG_DFL) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def watching_launchers(interval: float = 1.0):
    """Inside, a thread ends the process (143) once a launcher it watches has exited. The rendezvous
    blocks in C++ where no stop request is polled: with `deepspeed --no_ssh` (launch/run.sh NUM_NODES=2)
    and a node that never came, SIGTERM to run.sh reached only the `deepspeed` command and the waiting
    rank went on for the rendezvous timeout (601 s) before failing in a traceback."""
    import threading

    done = threading.Event()

    def watch():
        while not done.wait(interval):
            why = request()
            if why and not done.is_set():
                print(f"stopped before training started: {why}; nothing to save", file=sys.stderr, flush=True)
                if _STATE.on_exit is not None:
                    _STATE.on_exit()
                os._exit(STOP_EXIT_CODE)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def defer() -> None:
    """From now on a signal is a request honoured at the next optimizer-step boundary."""
    _STATE.deferred = True


def request() -> str | None:
    """Why this rank should stop ("received SIGTERM", "saw its launcher ... exit"), or None."""
    if _STATE.request is None:
        for p in _STATE.watched:
            if _gone(p):
                _STATE.request = f"saw its launcher (pid {p.pid}) exit"
                break
    return _STATE.request


def _handler(signum, frame) -> None:
    name = signal.Signals(signum).name
    if signum == signal.SIGHUP:
        _detach_terminal()
    if _STATE.deferred:
        _STATE.request = _STATE.request or f"received {name}"
        return
    print(f"stopped by {name} before training started; nothing to save", file=sys.stderr, flush=True)
    if _STATE.on_exit is not None:
        _STATE.on_exit()
    os._exit(STOP_EXIT_CODE)


def _detach_terminal() -> None:
    """After a hang-up, writing to the terminal fails (EIO) and would end the rank in the middle of its
    checkpoint: stdout and stderr that are a terminal now go to /dev/null (log files stay as they are;
    the run's own log lines are in OUTPUT_DIR.partial)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)


def _gone(p) -> bool:
    import psutil

    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _launchers() -> list:
    """DeepSpeed's per-node launcher above this rank and the `deepspeed` command above it, plus the
    processes of this host listed in RLHF_WATCH_PIDS. psutil handles compare start times, so a reused
    pid is not mistaken for the launcher."""
    import psutil

    out = []
    try:
        parent = psutil.Process().parent()
        if parent is not None and "deepspeed.launcher.launch" in " ".join(parent.cmdline()):
            out.append(parent)
            runner = parent.parent()
            if runner is not None and any("deepspeed" in part for part in runner.cmdline()):
                out.append(runner)
    except psutil.Error:
        pass
    host = socket.gethostname()
    for entry in os.environ.get(WATCH_ENV, "").split():
        h, _, pid = entry.rpartition(":")
        if h == host and pid.isdigit():
            try:
                out.append(psutil.Process(int(pid)))
            except psutil.Error:  # already gone: the job it belonged to is over
                _STATE.request = f"saw its launcher (pid {pid}) exit"
    return out
