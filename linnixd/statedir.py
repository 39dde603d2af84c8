"""The state directory: checked once, then every file in it reached through its fd, never through a link.

Under systemd the directory is the linnix user's (StateDirectory=), but the daemon does not rely
on that alone: the directory must be owned by the daemon's uid and writable by nobody else, and
each file must be a regular file of ours with one link, not writable by group or others. Reads
and writes go through the directory's fd with O_NOFOLLOW; temporary files are created with
O_EXCL. Anything else is refused with one log line and counted (Status: state.refused).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any

from .daemonlog import LOG_WARNING, log

MAX_FILE_BYTES = 4 << 20  # the JSON state files are a few KiB; anything near this is not ours
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


class StateError(Exception):
    """A state directory or file refused: the message is one line naming it and why."""


class StateDir:
    """The daemon's state directory, held open by fd; files are opened relative to it."""

    def __init__(self, path: str | os.PathLike[str], *, uid: int | None = None) -> None:
        self.path = os.fspath(path)
        self.uid = os.geteuid() if uid is None else uid
        self.refused = 0  # files refused since start (symlink, foreign owner, loose mode, ...)
        self.problems: list[str] = []  # the newest refusals, for Status
        try:
            os.mkdir(self.path, 0o750)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StateError(
                f"state directory {self.path}: cannot create it: {exc.strerror}"
            ) from None
        try:
            self.fd = os.open(
                self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
        except OSError as exc:
            reason = (
                "it is a symlink or not a directory"
                if exc.errno in (errno.ELOOP, errno.ENOTDIR)
                else exc.strerror
            )
            raise StateError(f"state directory {self.path} refused: {reason}") from None
        st = os.fstat(self.fd)
        why: str | None = None
        if st.st_uid != self.uid:
            why = f"owned by uid {st.st_uid}, not the daemon's uid {self.uid}"
        elif st.st_mode & 0o022:
            why = f"mode {stat.S_IMODE(st.st_mode):04o} lets group or others write to it"
        if why is not None:
            os.close(self.fd)
            raise StateError(f"state directory {self.path} refused: {why}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def where(self, name: str) -> str:
        return os.path.join(self.path, name)

    def refuse(self, name: str, why: str) -> StateError:
        """Count and log one refusal; returns the error for the caller to raise or report."""
        message = f"{self.where(name)} refused: {why}"
        self.refused += 1
        self.problems = [*self.problems, message][-5:]
        log(message, LOG_WARNING)
        return StateError(message)

    def status(self) -> dict[str, Any]:
        return {"path": self.path, "refused": self.refused, "problems": list(self.problems)}

    # ---- checks --------------------------------------------------------------------------

    def _problem(self, st: os.stat_result, private: bool) -> str | None:
        if stat.S_ISLNK(st.st_mode):
            return "it is a symlink"
        if not stat.S_ISREG(st.st_mode):
            return "it is not a regular file"
        if st.st_uid != self.uid:
            return f"owned by uid {st.st_uid}, not the daemon's uid {self.uid}"
        if st.st_nlink != 1:
            return f"it has {st.st_nlink} hard links"
        loose = 0o077 if private else 0o022
        if st.st_mode & loose:
            return f"mode {stat.S_IMODE(st.st_mode):04o} is not {'0600' if private else 'writable by the owner only'}"
        return None

    def check(self, name: str, *, private: bool = False) -> bool:
        """True when `name` exists and is acceptable, False when absent; refuses (raises) otherwise."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        why = self._problem(st, private)
        if why is not None:
            raise self.refuse(name, why)
        return True

    # ---- files ---------------------------------------------------------------------------

    def read_bytes(self, name: str, *, private: bool = False) -> bytes | None:
        """The file's bytes, None when absent; StateError when it is not an acceptable file."""
        try:
            fd = os.open(
                name,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY,
                dir_fd=self.fd,
            )
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self.refuse(name, "it is a symlink") from None
            raise self.refuse(name, f"cannot open it: {exc.strerror}") from None
        try:
            why = self._problem(os.fstat(fd), private)
            if why is not None:
                raise self.refuse(name, why)
            data = os.read(fd, MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                raise self.refuse(name, f"larger than {MAX_FILE_BYTES} bytes")
            return data
        finally:
            os.close(fd)

    def read_json(self, name: str, *, private: bool = False) -> Any:
        """The file's JSON, None when absent; a corrupt file is set aside (.corrupt) and None.

        StateError (already logged and counted) when the file is not an acceptable one.
        """
        data = self.read_bytes(name, private=private)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            aside = f"{name}.corrupt"
            log(
                f"{self.where(name)} is unreadable ({exc}); moved to {self.where(aside)}",
                LOG_WARNING,
            )
            try:
                os.replace(name, aside, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            except OSError:
                pass
            return None

    def write_atomic(self, name: str, data: bytes) -> None:
        """tmp (O_EXCL, 0600) + fsync + rename + fsync(dir): a reader or a crash sees old or new."""
        tmp = f".{name}.tmp"
        try:
            os.unlink(
                tmp, dir_fd=self.fd
            )  # a leftover of a crash, or a planted link: the link goes
        except FileNotFoundError:
            pass
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=self.fd,
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        os.fsync(self.fd)

    def write_json(self, name: str, data: Any) -> None:
        self.write_atomic(name, json.dumps(data, sort_keys=True, indent=1).encode())

    def sqlite_path(self, name: str) -> str:
        """A path for sqlite3.connect to `name` (created 0600 if absent) through the directory fd.

        SQLite opens by path, so the database and its -wal/-shm/-journal files are checked here
        first (a symlink at any of them is refused); the path goes through /proc/self/fd, so it
        names this directory even if the path given at start is later swapped.
        """
        for side in SQLITE_SIDE_FILES:
            self.check(name + side)
        if not self.check(name):
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self.fd,
            )
            os.close(fd)
        return f"/proc/self/fd/{self.fd}/{name}"
