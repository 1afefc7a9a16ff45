"""`tartarus sandbox shell`: this terminal, raw, wired to a terminal in the sandbox.

Keystrokes go to the sandbox as typed (^C included: the remote terminal turns it into SIGINT); what
the sandbox prints goes to our stdout from a second thread; SIGWINCH resizes the remote terminal. The
local terminal's settings are restored however the session ends.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from types import FrameType

from tartarus import errors
from tartarus.sdk.terminal import Pty

EOF_CHAR = b"\x04"  # what a terminal sends for ^D: ends a shell or a `cat` at the start of a line


def local_size(fd: int) -> tuple[int, int]:
    """Rows and columns of the terminal on `fd` (80x24 when it is not one)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return max(1, min(size.lines, 1000)), max(1, min(size.columns, 1000))


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The local terminal in raw mode for the block (no-op if `fd` is not a terminal)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def exit_status(pty: Pty) -> int:
    """The remote command's status as a shell reports it (128+N for signal N)."""
    if pty.signal:
        return 128 + pty.signal
    return pty.exit_code or 0


def interact(pty: Pty, stdin: int | None = None, stdout: int | None = None) -> int:
    """Relay `stdin`/`stdout` (default: ours) and `pty` until the remote command exits; its status."""
    stdin = sys.stdin.fileno() if stdin is None else stdin
    stdout = sys.stdout.fileno() if stdout is None else stdout
    wake_r, wake_w = os.pipe()  # the output thread's end and SIGWINCH reach the input loop here
    failure: list[BaseException] = []

    def copy_output() -> None:
        try:
            for chunk in pty:
                os.write(stdout, chunk)
        except BaseException as e:  # reported by the main thread
            failure.append(e)
        finally:
            os.write(wake_w, b"x")

    def on_winch(signum: int, frame: FrameType | None) -> None:
        os.write(wake_w, b"w")  # resize from the loop, not from inside a send the signal interrupted

    output = threading.Thread(target=copy_output, name="tartarus-shell-output", daemon=True)
    previous = signal.signal(signal.SIGWINCH, on_winch) if os.isatty(stdin) else None
    try:
        with raw_mode(stdin):
            output.start()
            stdin_open = True
            while True:
                watched = [wake_r, stdin] if stdin_open else [wake_r]
                ready, _, _ = select.select(watched, [], [])
                if wake_r in ready:
                    events = os.read(wake_r, 512)
                    if b"x" in events:
                        break
                    with contextlib.suppress(errors.SandboxFailed):
                        pty.resize(*local_size(stdin))
                if stdin in ready:
                    data = os.read(stdin, 65536)
                    try:
                        pty.send(data or EOF_CHAR)  # our input ended (a pipe): type ^D, then wait
                    except errors.SandboxFailed:
                        break  # the session is over; the output thread says how
                    stdin_open = bool(data)
    finally:
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)
        pty.close()
        output.join(timeout=10)
        os.close(wake_r)
        os.close(wake_w)
    if failure:
        error = failure[0]
        raise error if isinstance(error, errors.TartarusError) else errors.TartarusError(str(error))
    return exit_status(pty)
