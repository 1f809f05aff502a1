"""hfpipe's user errors through launchers: one line and exit code 2 under `accelerate launch`, `torchrun` and the
pipeline, as under plain `python`.

`hfpipe_launch_hook.pth` (PTH_LINE) runs at the start of every Python process of the environment and imports this
module only when the command line may be a launcher's; the module does nothing unless the process is `accelerate
launch` or `torchrun` (is_launcher). There it opens an inbox: a temp dir named in the environment the workers
inherit. A worker that stops on a user error (`hfpipe.errors.exit_on_user_error`) and whose parent opened the inbox
leaves its `error: ...` line there instead of printing it. When the workers failed with exit code 2 (the others, if
any, stopped by the launcher's signal), the launcher prints each distinct line once, last, and exits 2 instead of
raising CalledProcessError / ChildFailedError with a traceback and exit code 1. Any other failure keeps the
launcher's report and traceback, and any line left in the inbox is printed at exit. `hfpipe pipeline` opens an inbox
the same way for its stages.

A worker only hands its line over when its parent is the process that opened the inbox, so nothing is hidden when
the parent is not hooked (`python -S`, a custom launcher, mpirun): the worker prints the line itself.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing's: nothing is imported that the launchers' start-up does not need
if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

USER_ERROR_EXIT_CODE = 2  # hfpipe.errors takes it from here: importing hfpipe would load it in the launchers
INBOX_DIR = "HFPIPE_ERROR_INBOX"
INBOX_PID = "HFPIPE_ERROR_INBOX_PID"
# sys.orig_argv of a launcher: a console script's name, or a `-m` module; None: any subcommand, else that one.
LAUNCHER_SCRIPTS = {"accelerate": "launch", "accelerate-launch": None, "torchrun": None}
LAUNCHER_MODULES = {
    "accelerate.commands.accelerate_cli": "launch",
    "accelerate.commands.launch": None,
    "torch.distributed.run": None,
    "torch.distributed.launch": None,
}
_PYTHON_OPTIONS_WITH_VALUE = {"-W", "-X", "--check-hash-based-pycs"}
# The line of hfpipe_launch_hook.pth (setup.py writes it): a test cheaper than importing this module, true of every
# launcher's command line (and of a few others), so that no other process even imports this module.
PTH_LINE = (
    "import sys; any(name in arg for arg in sys.orig_argv[1:] for name in ('accelerate', 'torchrun', "
    "'torch.distributed.')) and __import__('hfpipe_launch_hook')\n"
)


def is_launcher(argv: list[str]) -> bool:
    """Whether `argv` (a `sys.orig_argv`) starts `accelerate launch` or `torchrun`; only reads the list."""
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            table, name = LAUNCHER_MODULES, next(args, "")
        elif arg == "-c" or arg == "-":
            return False
        elif arg in _PYTHON_OPTIONS_WITH_VALUE:
            next(args, None)
            continue
        elif arg.startswith("-"):
            continue
        else:
            table, name = LAUNCHER_SCRIPTS, os.path.basename(arg).removesuffix(".exe").removesuffix("-script.py")
        if name not in table:
            return False
        subcommand = table[name]
        return subcommand is None or next(args, None) == subcommand
    return False


def hand_over(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Leave `message` in the inbox of the parent process when `env` (default os.environ) names the parent's inbox;
    False (nothing written) otherwise, and the caller prints it."""
    env = os.environ if env is None else env
    directory = env.get(INBOX_DIR)
    if not directory or env.get(INBOX_PID) != str(os.getppid()):
        return False
    import time

    path = os.path.join(directory, f"{os.getpid()}-{time.monotonic_ns()}.txt")
    try:
        with open(f"{path}.part", "w", encoding="utf-8") as file:
            file.write(message)
        os.replace(f"{path}.part", path)  # a worker killed mid-write leaves no half line
    except OSError:
        return False
    return True


def report(message: str, env: Mapping[str, str] | None = None) -> None:
    """Hand `message` over to the parent's inbox (see hand_over), or print it on stderr."""
    if not hand_over(message, env):
        print(message, file=sys.stderr, flush=True)


class Inbox:
    """A temp dir the child processes leave their user-error lines in; `env` names it to them."""

    def __init__(self) -> None:
        import tempfile

        self.directory = tempfile.mkdtemp(prefix="hfpipe-errors-")
        self.env = {INBOX_DIR: self.directory, INBOX_PID: str(os.getpid())}

    def take(self) -> list[str]:
        """The distinct lines left so far, oldest first; each is returned once."""
        try:
            paths = [entry.path for entry in os.scandir(self.directory) if entry.name.endswith(".txt")]
        except OSError:
            return []
        messages: list[str] = []
        for path in sorted(paths, key=os.path.getmtime):
            with open(path, encoding="utf-8") as file:
                message = file.read()
            os.remove(path)
            if message not in messages:
                messages.append(message)
        return messages

    def close(self) -> None:
        """Remove the dir."""
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def stopped_on_user_error(error: BaseException, traceback: TracebackType | None) -> bool:
    """Whether `error` is a launcher's report that its worker(s) exited with the user-error code: the
    CalledProcessError of accelerate's launcher with that code, or torch elastic's ChildFailedError where some
    worker exited with it and every other failed one was stopped by the launcher (SIGTERM, then SIGKILL)."""
    import signal
    import subprocess

    if isinstance(error, subprocess.CalledProcessError):
        while traceback is not None and traceback.tb_next is not None:
            traceback = traceback.tb_next
        # Raised by the launcher about its worker, not by some other command a launcher ran.
        raised_in = traceback.tb_frame.f_globals.get("__name__") if traceback else None
        return raised_in == "accelerate.commands.launch" and error.returncode == USER_ERROR_EXIT_CODE
    elastic = sys.modules.get("torch.distributed.elastic.multiprocessing.errors")
    if elastic is None or not isinstance(error, elastic.ChildFailedError):
        return False
    codes = {failure.exitcode for failure in error.failures.values()}
    return USER_ERROR_EXIT_CODE in codes and codes <= {USER_ERROR_EXIT_CODE, -signal.SIGTERM, -signal.SIGKILL}


def install() -> None:
    """Make this launcher process cooperate: open an inbox for the workers, end on their user errors with exit
    code 2 and their lines last, and print at exit any line left."""
    import atexit

    inherited = {key: os.environ[key] for key in (INBOX_DIR, INBOX_PID) if key in os.environ}
    inbox = Inbox()
    os.environ.update(inbox.env)  # the launchers copy os.environ into each worker's environment
    previous = sys.excepthook

    def flush() -> None:
        if messages := inbox.take():
            report("\n".join(messages), inherited)  # the launcher's own parent (the pipeline) may have an inbox too

    def excepthook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        if not stopped_on_user_error(error, traceback):
            previous(kind, error, traceback)
            return
        flush()
        raise SystemExit(USER_ERROR_EXIT_CODE)  # from sys.excepthook, the interpreter exits with this code

    def at_exit() -> None:
        flush()
        inbox.close()

    sys.excepthook = excepthook
    atexit.register(at_exit)


if is_launcher(sys.orig_argv):
    install()
