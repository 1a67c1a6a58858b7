"""The errors a user can fix, and the one rule that maps each to a line and an exit code.

Every error a script reports in one line derives from `UserError`; its class says its
exit code. The scripts run their body through `report_errors`, which prints
`PROG: error: MESSAGE` for a UserError and returns its code, and turns Ctrl-C and
an exhausted memory into one line each, so that no user mistake ends in a traceback.

    exit code  meaning                                         raised as
    0          done
    1          could not go on: data missing or damaged, a     DataError, SaveError,
               disk full, training diverged, out of memory,    ResourceError
               another process lost
    2          a bad request: flag, config, checkpoint, file   UsageError (ConfigError,
               given, a folder in use                          CheckpointError, ...)
    130        Ctrl-C (SIGINT)                                 Interrupted
    143        SIGTERM                                         Interrupted
"""
from __future__ import annotations

import os
import sys

import torch

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class UserError(Exception):
    """A condition the user can fix; str(error) is one line naming the flag or file and
    what to do. Subclasses set `exit_code`."""

    exit_code = EXIT_FAILED


class UsageError(UserError, ValueError):
    """A bad request: a flag, a setting, a file or folder given that cannot work."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A setting that cannot work; the message names the flag and what is valid."""


class DataError(UserError, RuntimeError):
    """Data that cannot be read: missing, damaged, or not what it claims to be."""

    exit_code = EXIT_FAILED


class ResourceError(UserError, RuntimeError):
    """The machine ran out of something (memory, disk, another process of the run)."""

    exit_code = EXIT_FAILED


class Interrupted(UserError):
    """A signal stopped the work after saving what it could; args[0] is the message."""

    def __init__(self, message: str, signal_name: str = "SIGINT"):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return EXIT_SIGINT if self.signal_name == "SIGINT" else EXIT_SIGTERM


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message as one line (its first), or its class name."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's 'can't allocate memory'."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(error, (oom, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in str(error) or "not enough memory" in str(error)
        or "out of memory" in str(error).lower())


def report_errors(prog: str, body, *, oom_hint: str = "", interrupted: str = "") -> int:
    """Run `body()` and return its exit code; a UserError, Ctrl-C or an exhausted memory
    becomes one line on stderr (`prog: error: ...`) and its exit code."""
    try:
        return body() or EXIT_OK
    except Interrupted as stop:
        if str(stop):  # under torchrun, one process speaks
            print(str(stop), file=sys.stderr)
        return stop.exit_code
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # the reader went away (python main.py | head): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{'; ' + interrupted if interrupted else ''}", file=sys.stderr)
        return EXIT_SIGINT
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        print(f"{prog}: error: out of memory ({first_line(error, 120)})"
              + (f"; {oom_hint}" if oom_hint else ""), file=sys.stderr)
        return EXIT_FAILED
