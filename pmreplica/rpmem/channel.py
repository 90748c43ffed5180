"""The byte pipe to a started agent: its stdin and stdout, plus the tail of its stderr.

:class:`AgentChannel` is what every launcher returns. End of stream is never a silent
``b""``: it becomes an ``OSError`` whose errno and one-line message say why the agent went
away, judged from its exit status and stderr (127 is a command that was not found, an
OpenSSH client's 255 is a connection, authentication or host key failure).
"""

from __future__ import annotations

import abc
import collections
import errno
import logging
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable

from pmreplica.errors import RemoteError
from pmreplica.rpmem.address import Target

log = logging.getLogger("pmreplica.rpmem.launch")

# How long an end of stream waits for the exit status that explains it.
_EXIT_WAIT = 2.0
#: seconds a wait for the agent's exit goes on at a time before it looks whether the agent
#: was given up meanwhile
_SLICE = 0.05


class AgentConnectionLost(RemoteError, ConnectionResetError):
    """The agent's stream ended or broke (errno ECONNRESET)."""


class AgentTimeout(RemoteError, TimeoutError):
    """No progress on the agent's stream within the channel's timeout (errno ETIMEDOUT)."""


class StderrTail:
    """Drains a stderr stream in a thread: keeps its last lines, logs each one at DEBUG.

    Draining is needed, not only nice: an agent that writes more stderr than a pipe or an
    SSH window holds would otherwise stall, and with it the control channel."""

    def __init__(self, read: Callable[[int], bytes], name: str, keep: int = 20) -> None:
        self._read = read
        self._name = name
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._partial = b""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"stderr {name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                chunk = self._read(4096)
            except TimeoutError:
                continue
            except (OSError, EOFError, ValueError):
                break
            if not chunk:
                break
            self._feed(chunk)
        self._feed(b"", final=True)

    def _feed(self, chunk: bytes, final: bool = False) -> None:
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        if final and self._partial:
            complete.append(self._partial)
            self._partial = b""
        for raw in complete:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line.strip():
                log.debug("%s: %s", self._name, line)
                with self._lock:
                    self._lines.append(line)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def done(self) -> bool:
        """True once the stream has ended and every line is in."""
        return not self._thread.is_alive()

    def text(self) -> str:
        """The last lines received so far, newline-separated."""
        with self._lock:
            return "\n".join(self._lines)


def exit_error(target: Target, command: str, status: int | None, stderr: str) -> RemoteError:
    """The error for an agent that is gone, from its exit status and the tail of its stderr."""
    last = stderr.strip().splitlines()[-1].strip() if stderr.strip() else ""
    detail = f": {last}" if last else ""
    try:
        program = shlex.split(command)[0]
    except (ValueError, IndexError):
        program = command
    if status == 127:
        return RemoteError(errno.ENOENT, f"{target}: command not found: {program}{detail}")
    if status == 126:
        return RemoteError(errno.EACCES, f"{target}: command cannot be run: {program}{detail}")
    if status is None:
        return AgentConnectionLost(errno.ECONNRESET,
                                   f"{target}: connection to the agent closed{detail}")
    return AgentConnectionLost(errno.ECONNRESET,
                               f"{target}: agent {program} exited with status {status}{detail}")


class AgentChannel(abc.ABC):
    """The agent's stdin (:meth:`sendall`) and stdout (:meth:`recv_into`, :meth:`recv_exact`).

    Not for concurrent use by several threads; the control protocol is request/response.
    """

    def __init__(self, target: Target, command: str) -> None:
        self.target = target
        self.command = command  # the remote command line, for messages
        self._exit_status: int | None = None
        self._closed = False
        self._failure_seen: RemoteError | None = None
        self._stderr: StderrTail | None = None
        #: set by abort(): a close waiting for the agent to exit stops waiting
        self._given_up = threading.Event()

    # -- what a launcher provides -------------------------------------------------------
    @property
    @abc.abstractmethod
    def peer_address(self) -> str:
        """The IP address the data connections to this agent's node should go to."""

    @abc.abstractmethod
    def _send(self, data: bytes | bytearray | memoryview) -> None:
        """Send everything; raise OSError/EOFError when the stream is broken."""

    @abc.abstractmethod
    def _recv(self, buf: memoryview) -> int:
        """Read at least one byte into ``buf``; 0 at end of stream."""

    @abc.abstractmethod
    def settimeout(self, timeout: float | None) -> None:
        """Timeout in seconds for each send and receive; None blocks."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """A descriptor that polls readable when stdout data (or its end) is there."""

    @abc.abstractmethod
    def _wait_exit(self, timeout: float) -> int | None:
        """The exit status once known within ``timeout``, else None."""

    @abc.abstractmethod
    def _shutdown(self, timeout: float) -> int | None:
        """Send EOF, wait up to ``timeout`` for the agent to exit, release everything."""

    def _release(self) -> None:
        """Free what is left once the stderr reader is done (nothing by default)."""

    def _failure(self, status: int | None, stderr: str) -> RemoteError:
        return exit_error(self.target, self.command, status, stderr)

    # -- the public API -----------------------------------------------------------------
    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` to the agent's stdin."""
        self._check_open()
        try:
            self._send(data)
        except TimeoutError:
            raise self._timeout("sending to") from None
        except (OSError, EOFError) as exc:
            raise self._lost() from exc

    def recv_into(self, buf: bytearray | memoryview) -> int:
        """Read up to ``len(buf)`` bytes (at least one) of the agent's stdout into ``buf``."""
        self._check_open()
        view = memoryview(buf).cast("B")
        if not len(view):
            return 0
        try:
            count = self._recv(view)
        except TimeoutError:
            raise self._timeout("waiting for") from None
        except (OSError, EOFError) as exc:
            raise self._lost() from exc
        if count == 0:
            raise self._lost()
        return count

    def recv_exact_into(self, buf: bytearray | memoryview) -> None:
        """Fill all of ``buf``; an end of stream part way is an error."""
        view = memoryview(buf).cast("B")
        while len(view):
            count = self.recv_into(view)
            view = view[count:]

    def recv_exact(self, size: int) -> bytes:
        """Read exactly ``size`` bytes."""
        buf = bytearray(size)
        self.recv_exact_into(buf)
        return bytes(buf)

    def stderr_tail(self) -> str:
        """The last lines the agent (or the ssh client) wrote to stderr."""
        return self._stderr.text() if self._stderr is not None else ""

    @property
    def exit_status(self) -> int | None:
        """The agent's exit status, once it has exited and the status is known."""
        if self._exit_status is None and not self._closed:
            self._exit_status = self._wait_exit(0)
        return self._exit_status

    def close(self, timeout: float = 5.0) -> int | None:
        """Close the agent's stdin, wait for it to exit; its exit status, or None if unknown
        (killed after ``timeout``, or ended by a signal). Idempotent."""
        if not self._closed:
            self._closed = True
            self._exit_status = self._shutdown(timeout)
            if self._stderr is not None:
                self._stderr.join(1.0)
            self._release()
        return self._exit_status

    def abort(self) -> None:
        """Give the agent up without waiting on it (its host stopped answering): calls that
        are blocked on the channel, or come later, fail now; what the channel holds is
        released in a background thread. Idempotent."""
        self._given_up.set()  # a close under way waits on this host no longer
        if self._closed or self._failure_seen is not None:
            return
        self._failure_seen = AgentConnectionLost(errno.ECONNRESET,
                                                 f"{self.target}: the agent was given up")
        threading.Thread(target=self._abandon, name=f"abandon {self.target}",
                         daemon=True).start()

    def _abandon(self) -> None:
        """Release the channel of an agent given up (in a background thread)."""
        self.close(timeout=0.0)

    def __enter__(self) -> "AgentChannel":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.target} {self.command!r}>"

    # -- helpers ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._failure_seen is not None:
            seen = self._failure_seen
            raise type(seen)(seen.errno, seen.strerror)
        if self._closed:
            raise RemoteError(errno.EBADF, f"{self.target}: agent channel is closed")

    def _wait_unless_given_up(self, done: Callable[[float], bool], timeout: float) -> bool:
        """``done(seconds)`` (a wait for the agent's exit, True once it exited) for up to
        ``timeout``, a slice at a time: when the heartbeat finds the host dead meanwhile
        (abort(), during a close), the wait ends at once. True if the agent exited."""
        end = time.monotonic() + timeout
        while not done(max(0.0, min(_SLICE, end - time.monotonic()))):
            if self._given_up.is_set() or time.monotonic() >= end:
                return False
        return True

    def _timeout(self, what: str) -> AgentTimeout:
        return AgentTimeout(errno.ETIMEDOUT, f"{self.target}: timed out {what} the agent")

    def _lost(self) -> RemoteError:
        """The error for a stream that ended: wait briefly for the exit status and stderr."""
        if self._failure_seen is not None:  # given up (abort): nothing more to wait for
            return self._failure_seen
        status = self._wait_exit(_EXIT_WAIT)
        if status is not None:
            self._exit_status = status
        if self._stderr is not None:
            self._stderr.join(0.5)
        failure = self._failure(status, self.stderr_tail())
        if status is not None:
            # The agent is gone for good: free the channel now (close() stays harmless) and
            # answer any further use with the same error.
            self.close(timeout=0.5)
            self._failure_seen = failure
        return failure


class ProcessChannel(AgentChannel):
    """An agent behind a local child process (the agent itself, or an ssh client running it).

    stdin and stdout are socket pairs, as librpmem used: the parent's ends are sockets, so
    timeouts and ``recv_into`` straight into the caller's buffer come for free."""

    def __init__(self, target: Target, command: str, argv: list[str],
                 env: dict[str, str] | None, peer: Callable[[], str], what: str) -> None:
        super().__init__(target, command)
        self._peer = peer
        self._peer_address: str | None = None
        stdin_parent, stdin_child = socket.socketpair()
        stdout_parent, stdout_child = socket.socketpair()
        try:
            self._proc = subprocess.Popen(argv, stdin=stdin_child, stdout=stdout_child,
                                          stderr=subprocess.PIPE, env=env,
                                          start_new_session=True)
        except OSError as exc:
            for sock in (stdin_parent, stdout_parent):
                sock.close()
            raise RemoteError(exc.errno or errno.ENOENT,
                              f"{target}: cannot run {what} {argv[0]!r}: {exc.strerror}") from None
        finally:
            stdin_child.close()
            stdout_child.close()
        self._tx = stdin_parent
        self._rx = stdout_parent
        assert self._proc.stderr is not None
        self._stderr = StderrTail(self._proc.stderr.read1, f"{target} ({what})")

    @property
    def peer_address(self) -> str:
        if self._peer_address is None:
            self._peer_address = self._peer()
        return self._peer_address

    @property
    def pid(self) -> int:
        """The child process (the agent for the local launcher, ssh for OpenSSH)."""
        return self._proc.pid

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        # MSG_NOSIGNAL: an agent that exited must be an error here, not a SIGPIPE for a host
        # application that runs with SIGPIPE at its default
        self._tx.sendall(data, socket.MSG_NOSIGNAL)

    def _recv(self, buf: memoryview) -> int:
        return self._rx.recv_into(buf)

    def settimeout(self, timeout: float | None) -> None:
        self._tx.settimeout(timeout)
        self._rx.settimeout(timeout)

    def fileno(self) -> int:
        return self._rx.fileno()

    def _exited(self, timeout: float) -> bool:
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _wait_exit(self, timeout: float) -> int | None:
        if not self._wait_unless_given_up(self._exited, timeout):
            return None
        status = self._proc.returncode
        return status if status >= 0 else None

    def _shutdown(self, timeout: float) -> int | None:
        try:
            self._tx.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        status = self._wait_exit(timeout)
        if self._proc.returncode is None:
            if timeout and not self._given_up.is_set():
                log.warning("%s: agent did not exit within %.1f s of its stdin closing; "
                            "killing it", self.target, timeout)
            self._proc.kill()
            self._proc.wait()
        self._tx.close()
        self._rx.close()
        return status if status is not None and status >= 0 else None

    def _release(self) -> None:
        assert self._proc.stderr is not None
        if self._stderr is not None and self._stderr.done:
            self._proc.stderr.close()
