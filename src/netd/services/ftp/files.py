"""
The file side of the ftp kind: accounts, confined shells, and uploads (batched
writes off the reactor thread).  Downloads go through L{netd.sendfile}.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import os
import pwd
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import attrs
from twisted.cred import credentials, error
from twisted.cred.checkers import ANONYMOUS, ICredentialsChecker
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.protocols import ftp
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from netd import passwords
from netd.kinds import RunInThread
from netd.records import Record

__all__ = [
    "FACTS",
    "UPLOAD_PREFIX",
    "Accounts",
    "NameNotAllowed",
    "NoSpace",
    "NotAFolder",
    "Realm",
    "Refused",
    "Shell",
    "Upload",
    "User",
    "remove_namespace_folders",
]

# Uploads are written under this prefix next to their final name and renamed
# when complete; names with it are hidden and cannot be addressed by clients.
UPLOAD_PREFIX = ".~netd-upload."

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

_log = Logger(namespace="netd.ftp")

Segments = list[str]
_T = TypeVar("_T")

# The MLST/MLSD facts offered (RFC 3659 section 7), in the order they are written.
FACTS = ("type", "size", "modify", "perm", "unique")


@attrs.frozen(repr=False)
class User(Record):
    """
    One account of the C{users} map.

    @ivar password_hash: a bcrypt (C{$2b$...}) or crypt(3) hash.
    """

    name: str
    home: Path
    write: bool = False
    password: str | None = attrs.field(default=None, repr=False)
    password_hash: str | None = attrs.field(default=None, repr=False)


def _burn_time(password: bytes, hashed: str) -> bool:
    """Check against another user's hash, so an unknown name costs what a known one does."""
    passwords.verify(password, hashed)
    return False


@implementer(ICredentialsChecker)
class Accounts:
    """Checks anonymous logins against C{anonymous} and passwords against C{users}."""

    credentialInterfaces = (credentials.IAnonymous, credentials.IUsernamePassword)

    def __init__(
        self, users: Mapping[str, User], anonymous: bool, run_in_thread: RunInThread
    ) -> None:
        self.users = users
        self.anonymous = anonymous
        self.run_in_thread = run_in_thread

    def requestAvatarId(self, offered: Any) -> Deferred[Any]:
        if credentials.IAnonymous.providedBy(offered):
            if self.anonymous:
                return succeed(ANONYMOUS)
            return fail(error.UnauthorizedLogin())
        name = offered.username
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        # Compared as the bytes the client sent: a password that is not UTF-8 is a
        # wrong one, never an error (the session decodes lines with surrogateescape).
        password = offered.password
        if isinstance(password, str):
            password = password.encode("utf-8", "surrogateescape")
        user = self.users.get(name)
        if user is None:
            decoy = next((u.password_hash for u in self.users.values() if u.password_hash), None)
            checked: Deferred[bool] = (
                self.run_in_thread(_burn_time, password, decoy)
                if decoy is not None
                else succeed(False)
            )
        else:
            stored = user.password if user.password is not None else user.password_hash
            assert stored is not None
            checked = passwords.check(password, stored, self.run_in_thread)

        def decide(ok: bool) -> Any:
            if not ok:
                raise error.UnauthorizedLogin()
            return name

        return checked.addCallback(decide)


@implementer(IRealm)
class Realm:
    """Gives anonymous users the anonymous root and every user their own home."""

    def __init__(
        self,
        root: Path | None,
        anonymous_write: bool,
        users: Mapping[str, User],
        run_in_thread: RunInThread = maybeDeferred,
        umask: int = 0o022,
    ) -> None:
        self.root = root
        self.anonymous_write = anonymous_write
        self.users = users
        self.run_in_thread = run_in_thread
        self.umask = umask
        self._places: dict[Path, Place] = {}

    def requestAvatar(self, avatar_id: Any, mind: object, *interfaces: Any) -> Any:
        if ftp.IFTPShell not in interfaces:
            raise NotImplementedError("only FTP shells")
        if avatar_id is ANONYMOUS:
            assert self.root is not None
            shell = Shell(
                self._place(self.root),
                self.anonymous_write,
                self.run_in_thread,
                self.umask,
                anonymous=True,
            )
        else:
            user = self.users[avatar_id]
            shell = Shell(self._place(user.home), user.write, self.run_in_thread, self.umask)
        return ftp.IFTPShell, shell, lambda: None

    def _place(self, root: Path) -> Place:
        # Found at the first login, not at build: twistd drops privileges after
        # the map is built, and the rights are the daemon's then.  Kept until a
        # reload builds the realm again, so a login makes no system call on
        # the reactor's thread (a realpath, a pathconf, the process's groups).
        found = self._places.get(root)
        if found is None:
            found = self._places[root] = Place.of(root)
        return found


def remove_namespace_folders(roots: Iterable[Path], folder: str) -> int:
    """
    Remove the folder C{folder} (a namespace's) of each root, how many went
    (blocking: run in a thread).  A link of that name is left, not followed.
    """
    removed = 0
    for root in {os.path.realpath(root) for root in roots}:
        path = os.path.join(root, folder)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed += not os.path.lexists(path)
    return removed


_UNSAFE = frozenset("\0\r\n")


class Refused(ftp.FTPCmdError):
    """550 with the reason, for what Twisted's shell has no error of its own."""

    errorCode = ftp.REQ_ACTN_NOT_TAKEN


class NameNotAllowed(ftp.FTPCmdError):
    """553: a name the filesystem cannot hold (too long)."""

    errorCode = ftp.FILENAME_NOT_ALLOWED


class NoSpace(ftp.FTPCmdError):
    """452: the filesystem is full."""

    errorCode = ftp.REQ_ACTN_ABRTD_INSUFF_STORAGE


def _denied(path: Segments) -> ftp.FTPCmdError:
    return ftp.PermissionDeniedError("/".join(path))


class Shell(ftp.FTPShell):
    """
    Twisted's filesystem shell, confined: every path is resolved (symlinks too)
    and must stay under the root; writes need the C{write} flag.
    """

    def __init__(
        self,
        place: Place,
        writable: bool,
        run_in_thread: RunInThread = maybeDeferred,
        umask: int = 0o022,
        anonymous: bool = False,
    ) -> None:
        super().__init__(FilePath(place.real_root))
        self.real_root = place.real_root
        self.writable = writable
        self.run_in_thread = run_in_thread
        self.umask = umask
        self.anonymous = anonymous
        self.name_max = place.name_max
        self.rights = place.rights

    def _path(self, path: Segments) -> FilePath[str]:
        # CR and LF would forge lines in listings and replies; NUL ends C strings.
        if any(segment.startswith(UPLOAD_PREFIX) or _UNSAFE & set(segment) for segment in path):
            raise _denied(path)
        # Refused before any system call: an upload would otherwise only fail at
        # its final rename, after the whole file came in.
        if any(len(segment.encode("utf-8", "surrogateescape")) > self.name_max for segment in path):
            raise NameNotAllowed()
        try:
            found: FilePath[str] = self.filesystemRoot.descendant(path)
        except Exception:
            raise ftp.FileNotFoundError("/".join(path)) from None
        if not self._inside(found.path):
            raise _denied(path)
        return found

    def for_namespace(self, folder: str) -> Shell:
        """
        This shell's twin rooted in C{folder} of its root, made if missing
        (blocking: run in a thread).  A folder that is a link, or a file, is
        refused (L{Refused}).
        """
        path = os.path.join(self.real_root, folder)
        try:
            os.mkdir(path)
            os.chmod(path, 0o777 & ~self.umask)  # the service's umask, not the daemon's
        except FileExistsError:
            pass
        if os.path.islink(path) or not os.path.isdir(path):
            raise Refused(f"{folder}: not a folder")
        place = Place.of(Path(path))
        return Shell(place, self.writable, self.run_in_thread, self.umask, self.anonymous)

    def _writing(self, path: Segments) -> None:
        if not self.writable:
            raise _denied(path)

    # Twisted's shell fails with the bare OSError of every errno it has no FTP
    # error for (ENOTEMPTY, EINVAL, ENAMETOOLONG...): each operation passes
    # through _translated, so that every one gets a reply of its own.

    # Twisted's shell answers with Deferreds fired at once, after its system calls:
    # each operation runs whole in a thread (_threaded), off the reactor.

    def _threaded(self, operation: Callable[[], Deferred[Any]], path: Segments) -> Deferred[Any]:
        return _translated(self.run_in_thread(lambda: _settled(operation())), path)

    def makeDirectory(self, path: Segments) -> Deferred[None]:
        self._writing(path)

        def make() -> Deferred[None]:
            made: Deferred[None] = super(Shell, self).makeDirectory(path)
            # The service's umask, whatever the daemon's own is.
            return made.addCallback(lambda _: os.chmod(self._path(path).path, 0o777 & ~self.umask))

        return self._threaded(make, path)

    def removeDirectory(self, path: Segments) -> Deferred[None]:
        self._writing(path)
        if not path:
            return fail(_denied(path))
        return self._threaded(lambda: super(Shell, self).removeDirectory(path), path)

    def removeFile(self, path: Segments) -> Deferred[None]:
        self._writing(path)
        return self._threaded(lambda: super(Shell, self).removeFile(path), path)

    def rename(self, from_path: Segments, to_path: Segments) -> Deferred[None]:
        self._writing(from_path)
        if not from_path or not to_path:
            return fail(_denied(from_path))
        if len(to_path) > len(from_path) and to_path[: len(from_path)] == from_path:
            # rename(2) says EINVAL; the client is better told why.
            return fail(Refused(f"{'/'.join(from_path)}: cannot be moved into itself"))
        return self._threaded(lambda: super(Shell, self).rename(from_path, to_path), from_path)

    def access(self, path: Segments) -> Deferred[None]:
        return self._threaded(lambda: super(Shell, self).access(path), path)

    def stat(self, path: Segments, keys: Any = ()) -> Deferred[Any]:
        return self._threaded(lambda: super(Shell, self).stat(path, keys), path)

    def require_directory(self, path: Segments) -> None:
        """
        C{path} is used as a directory (a name followed by C{/}, C{.} or C{..}):
        as for POSIX C{open("file/")}, an existing file there is not a directory.
        """
        found = self._path(path)
        if found.exists() and not found.isdir():
            raise _not_a_directory(path)

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.real_root or real.startswith(self.real_root + os.sep)

    def listing(self, path: Segments, long: bool) -> list[bytes]:
        """
        The lines of a LIST (C{long}) or NLST of C{path}, one C{stat} per entry.

        Uploads in progress and links out of the root (whose details would
        describe files the client may not reach) are left out.
        """
        found = self._path(path)
        try:
            if found.isdir():
                with os.scandir(found.path) as scan:
                    entries = [(e.name, e.path, e.is_symlink()) for e in scan]
            elif found.exists():
                entries = [(found.basename(), found.path, found.islink())]
            else:
                raise ftp.FileNotFoundError("/".join(path))
        except OSError as e:
            raise _error(e, path) from None
        year = time.gmtime().tm_year
        lines = []
        for name, full, link in _paced(sorted(entries)):
            if name.startswith(UPLOAD_PREFIX) or (link and not self._inside(full)):
                continue
            encoded = name.encode("utf-8", "surrogateescape")
            if not long:
                lines.append(encoded)
                continue
            try:
                info = os.stat(full)
            except OSError:
                continue  # a dangling link, or gone since the scan
            lines.append(_list_line(encoded, info, year))
        return lines

    def facts(self, path: Segments, selected: tuple[str, ...], entries: bool) -> list[bytes]:
        """
        MLSD (C{entries}: the folder C{path} holds, after a C{type=cdir} line for
        itself) or MLST (C{path} alone, named by its full path) lines: the
        C{selected} facts of each, then a space and the name (RFC 3659 section 7).
        """
        found = self._path(path)
        shown = "/" + "/".join(path)
        try:
            info = os.stat(found.path)
            parent = os.stat(os.path.dirname(os.path.realpath(found.path)))
            if not entries:
                return [self._fact_line(shown, info, parent, selected, bool(path), None)]
            if not stat.S_ISDIR(info.st_mode):
                raise NotAFolder(f"{shown}: {os.strerror(errno.ENOTDIR)}")
            with os.scandir(found.path) as scan:
                found_entries = [(e.name, e.path, e.is_symlink()) for e in scan]
        except OSError as e:
            raise _error(e, path) from None
        lines = [self._fact_line(".", info, parent, selected, bool(path), "cdir")]
        for name, full, link in _paced(sorted(found_entries)):
            if name.startswith(UPLOAD_PREFIX) or (link and not self._inside(full)):
                continue
            try:
                entry = os.stat(full)
            except OSError:
                continue  # a dangling link, or gone since the scan
            lines.append(self._fact_line(name, entry, info, selected, True, None))
        return lines

    def _fact_line(
        self,
        name: str,
        info: os.stat_result,
        parent: os.stat_result,
        selected: tuple[str, ...],
        removable: bool,
        kind: str | None,
    ) -> bytes:
        folder = stat.S_ISDIR(info.st_mode)
        values = {
            "type": kind or ("dir" if folder else "file"),
            "size": None if folder else str(info.st_size),
            "modify": time.strftime("%Y%m%d%H%M%S", time.gmtime(info.st_mtime)),
            "perm": self._perm(info, parent, removable),
            "unique": f"{info.st_dev:x}g{info.st_ino:x}",
        }
        facts = "".join(f"{fact}={values[fact]};" for fact in selected if values[fact] is not None)
        return f"{facts} {name}".encode("utf-8", "surrogateescape")

    def _perm(self, info: os.stat_result, parent: os.stat_result, removable: bool) -> str:
        """
        The C{perm} fact: what this user may do with the entry, which needs the
        shell's C{write} flag for any change and the daemon's own file rights.
        """
        may = self.rights.may
        write = self.writable
        # Removing or renaming an entry is a change to the folder holding it.
        movable = "df" if write and removable and may(parent, 0o3) else ""
        if stat.S_ISDIR(info.st_mode):
            enter = "e" if may(info, 0o1) else ""
            listed = "l" if may(info, 0o5) else ""
            create = "cmp" if write and may(info, 0o3) else ""
            return "".join(sorted(enter + listed + create + movable))
        read = "r" if may(info, 0o4) else ""
        change = "aw" if write and may(info, 0o2) else ""
        return "".join(sorted(read + change + movable))

    def set_modified(self, path: Segments, when: float) -> None:
        """MFMT: the modification time of the file C{path} becomes C{when}."""
        self._writing(path)
        with self._handle(path) as handle:
            info = os.fstat(handle)
            os.utime(handle, ns=(info.st_atime_ns, int(when * 1e9)))

    def change_mode(self, path: Segments, mode: int) -> int:
        """SITE CHMOD, for users who may write: C{mode} less the umask's bits, as set."""
        if self.anonymous:
            raise _denied(path)
        self._writing(path)
        granted = mode & 0o777 & ~self.umask
        with self._handle(path) as handle:
            os.chmod(handle, granted)
        return granted

    @contextlib.contextmanager
    def _handle(self, path: Segments) -> Iterator[int]:
        """The entry at C{path}, opened without following a link swapped in since the check."""
        if not path:
            raise _denied(path)
        real = os.path.realpath(self._path(path).path)
        try:
            handle = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            raise _error(e, path) from None
        try:
            yield handle
        except OSError as e:
            raise _error(e, path) from None
        finally:
            os.close(handle)

    def open_for_reading(self, path: Segments) -> IO[bytes]:
        """Open a file to send; raises an L{ftp.FTPCmdError} the client can be told."""
        found = self._path(path)
        if found.isdir():
            raise ftp.IsADirectoryError("/".join(path))
        try:
            return open(found.path, "rb")
        except OSError as e:
            raise _error(e, path) from None

    def upload_target(self, path: Segments) -> Path:
        """Where an upload of C{path} ends up, after the checks a write needs."""
        self._writing(path)
        if not path:
            raise ftp.IsADirectoryError("/")
        found = self._path(path)
        if found.isdir():
            raise ftp.IsADirectoryError("/".join(path))
        if not found.parent().isdir():
            raise ftp.FileNotFoundError("/".join(path))
        return Path(found.path)


@attrs.frozen(repr=False)
class Place(Record):
    """What a shell needs of its root and of the daemon, found with system calls."""

    real_root: str
    name_max: int
    rights: _Rights

    @classmethod
    def of(cls, root: Path) -> Place:
        """(blocking) C{root}'s real path, its longest name, who the daemon is now."""
        real_root = os.path.realpath(root)
        groups = frozenset({os.getegid(), *os.getgroups()})
        return cls(real_root, _name_max(real_root), _Rights(os.geteuid(), groups))


@attrs.frozen(repr=False)
class _Rights(Record):
    """The daemon's user and groups, to tell what it may do to a file from its stat."""

    uid: int
    groups: frozenset[int]

    def may(self, info: os.stat_result, wanted: int) -> bool:
        """Whether every bit of C{wanted} (4 read, 2 write, 1 search/execute) is granted."""
        if self.uid == 0:
            return not wanted & 1 or bool(info.st_mode & 0o111) or stat.S_ISDIR(info.st_mode)
        if info.st_uid == self.uid:
            granted = info.st_mode >> 6
        elif info.st_gid in self.groups:
            granted = info.st_mode >> 3
        else:
            granted = info.st_mode
        return granted & wanted == wanted


class NotAFolder(ftp.FTPCmdError):
    """501: MLSD of a file (RFC 3659 section 7.2.1)."""

    errorCode = ftp.SYNTAX_ERR_IN_ARGS


# Entries a listing thread describes between two pauses.
_PACE = 32


def _paced(entries: list[_T]) -> Iterator[_T]:
    """
    C{entries}, with the GIL let go every L{_PACE} of them: a thread that holds
    it for its whole switch interval (5 ms) can keep the reactor thread waiting
    that long after each of its system calls, and transfers crawl meanwhile.
    """
    for index, entry in enumerate(entries):
        if index and not index % _PACE:
            time.sleep(0)
        yield entry


def _settled(result: Deferred[Any]) -> Any:
    """The value of a Deferred that has fired (Twisted's shell), raised if a failure."""
    outcome: list[Any] = []
    result.addBoth(outcome.append)
    value = outcome[0]
    if isinstance(value, Failure):
        value.raiseException()
    return value


@functools.lru_cache(maxsize=256)
def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name[:8]
    except KeyError:
        return str(uid)


@functools.lru_cache(maxsize=256)
def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name[:8]
    except KeyError:
        return str(gid)


def _list_line(name: bytes, info: os.stat_result, year: int) -> bytes:
    """One line of C{ls -l}, the format every FTP client parses (as Twisted writes it)."""
    when = time.gmtime(info.st_mtime)
    date = time.strftime("%b %d %H:%M" if when.tm_year == year else "%b %d  %Y", when)
    head = (
        f"{stat.filemode(info.st_mode)}{info.st_nlink:4d} {_owner(info.st_uid):<9}"
        f"{_group(info.st_gid):<9}{info.st_size:15d} {date:>12} "
    )
    return head.encode() + name


# What a client's request can cause; any other errno is the server's trouble.
_CLIENT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.EINVAL,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.EILSEQ,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.EXDEV,
        errno.EBUSY,
        errno.EMLINK,
        errno.ENOSPC,
        errno.EDQUOT,
    }
)


def _error(e: OSError, path: Segments) -> ftp.FTPCmdError:
    """The FTP error, with its reply code and reason, for a failed system call on C{path}."""
    name = "/".join(path)
    code = e.errno
    if code not in _CLIENT_ERRNOS:
        _log.warn("ftp: {path!r}: {error}", path=name, error=e)
    if code == errno.ENOENT:
        return ftp.FileNotFoundError(name)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ftp.PermissionDeniedError(name)
    if code == errno.EISDIR:
        return ftp.IsADirectoryError(name)
    if code == errno.EEXIST:
        return ftp.FileExistsError(name)
    if code == errno.ENAMETOOLONG:
        return NameNotAllowed()
    if code in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace()
    reason = os.strerror(code) if code is not None else str(e)
    return Refused(f"{name}: {reason}")


def _not_a_directory(path: Segments) -> ftp.FTPCmdError:
    return Refused(f"{'/'.join(path)}: {os.strerror(errno.ENOTDIR)}")


def _translated(result: Deferred[Any], path: Segments) -> Deferred[Any]:
    def translate(reason: Failure) -> Failure:
        # Twisted's own ENOTDIR error speaks of RMD whatever the command was.
        if reason.check(ftp.IsNotADirectoryError):
            return Failure(_not_a_directory(path))
        failed = reason.value
        if not isinstance(failed, OSError):
            return reason
        return Failure(_error(failed, path))

    return result.addErrback(translate)


def _name_max(root: str) -> int:
    try:
        return os.pathconf(root, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


# The first read of an upload into its own buffer (L{Upload.space}) offers this much.
_FIRST_READ = 64 << 10


class Upload:
    """
    An upload in progress: bytes are batched in memory and written by a thread
    to a temporary file next to the target, renamed over it only when complete.

    A batch is gathered in a buffer of C{batch} bytes that the upload keeps and
    fills again once written, not as the reads' own bytes objects: freeing a
    batch of those let glibc give the heap's top back after every batch and
    fault it in again for the next (a third of an upload's system time).

    @ivar offset: C{REST} (or the current size, for C{APPE}): that many bytes of
        the existing file are copied into the temporary file first.
    """

    batch = 1 << 20
    high_water = 8 << 20

    def __init__(
        self,
        target: Path,
        offset: int,
        run_in_thread: RunInThread,
        pause: Callable[[bool], None],
        root: str,
        mode: int = 0o644,
    ) -> None:
        self.target = target
        self.offset = offset
        self.root = root
        self.mode = mode
        self.temporary = target.with_name(UPLOAD_PREFIX + secrets.token_hex(8))
        # The folder, held open from the moment the data connection comes: what
        # the checks saw at STOR may have been swapped for a link since.
        self._folder: int | None = None
        self.run_in_thread = run_in_thread
        self.pause = pause
        self.received = 0
        # Batches full and waiting for the writer, the one being filled, and
        # buffers written and free to fill again.
        self._full: list[memoryview] = []
        self._filling: bytearray | None = None
        self._filled = 0
        self._free: list[bytearray] = []
        # Bytes received and not yet handed to the writer.
        self._pending_bytes = 0
        self._writing: Deferred[None] | None = None
        self._paused = False
        self._failed: Failure | None = None
        self._finishing = False
        self._file: IO[bytes] | None = None

    def open(self) -> Deferred[None]:
        self._writing = self.run_in_thread(self._open)
        return self._writing.addCallbacks(self._written, self._write_failed)

    def _open(self) -> None:
        folder = os.open(self.target.parent, os.O_RDONLY | os.O_DIRECTORY)
        self._folder = folder
        real = os.readlink(f"/proc/self/fd/{folder}")
        if real != self.root and not real.startswith(self.root.rstrip("/") + "/"):
            raise PermissionError(f"{self.target.parent} left the root")
        # Created, never followed: a link planted under the temporary name fails.
        created = os.open(
            self.temporary.name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
            0o644,
            dir_fd=folder,
        )
        os.fchmod(created, self.mode)  # the service's umask, not the daemon's
        # Unbuffered: batches go to the kernel in one writev, never copied again.
        self._file = open(created, "wb", buffering=0)  # noqa: SIM115 (closed in _close)
        if self.offset:
            kept = os.open(self.target.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=folder)
            try:
                left = self.offset
                while left:
                    copied = os.sendfile(self._file.fileno(), kept, None, left)
                    if not copied:
                        break
                    left -= copied
            finally:
                os.close(kept)

    def write(self, data: bytes) -> None:
        """Take C{data}, copied into the batch being filled."""
        rest = memoryview(data)
        while rest:
            if self._filling is None:
                # A new buffer grows with what comes (a small upload stays
                # small); a written one is filled again in place.
                self._filling = self._free.pop() if self._free else bytearray()
                self._filled = 0
            piece = rest[: self.batch - self._filled]
            self._filling[self._filled : self._filled + len(piece)] = piece
            self._advance(len(piece))
            rest = rest[len(piece) :]
        self._settle()

    def space(self) -> memoryview:
        """
        Where the next bytes go: the rest of the buffer being filled, for a
        socket to read into (then L{filled}), which spares the copy L{write}
        makes.  An upload's first buffer starts at C{_FIRST_READ} bytes and
        doubles as it fills, up to a batch, so a small upload stays small here
        too.
        """
        filling = self._filling
        if filling is None:
            if self._free:
                filling = self._free.pop()
            else:
                # Whole from the second batch on: the first showed a large upload.
                size = self.batch if self.received else min(_FIRST_READ, self.batch)
                filling = bytearray(size)
            self._filling = filling
            self._filled = 0
        elif self._filled == len(filling):
            grow = max(len(filling), _FIRST_READ)
            filling.extend(bytes(min(grow, self.batch - len(filling))))
        return memoryview(filling)[self._filled :]

    def filled(self, count: int) -> None:
        """C{count} bytes were put at the start of L{space}."""
        self._advance(count)
        self._settle()

    def _advance(self, count: int) -> None:
        self.received += count
        self._pending_bytes += count
        self._filled += count
        if self._filled == self.batch:
            assert self._filling is not None
            self._full.append(memoryview(self._filling))
            self._filling = None

    def _settle(self) -> None:
        """A full batch goes to the writer if it is free; too much waiting pauses the reads."""
        if self._writing is None and self._full:
            self._flush()
        elif self._pending_bytes >= self.high_water and not self._paused:
            self._paused = True
            self.pause(True)

    def _flush(self) -> Deferred[None]:
        batch = self._full.pop(0)
        self._pending_bytes -= len(batch)
        assert self._file is not None
        self._writing = self.run_in_thread(_write_all, self._file.fileno(), [batch])
        return self._writing.addCallbacks(self._written, self._write_failed, (batch,))

    def _written(self, result: object, batch: memoryview | None = None) -> None:
        self._writing = None
        if batch is not None:
            buffer = batch.obj
            batch.release()
            # Two buffers keep a steady upload going: one written, one filled.
            if isinstance(buffer, bytearray) and len(self._free) < 2:
                self._free.append(buffer)
        if self._full and not (self._failed or self._finishing):
            self._flush()
        if self._paused and self._pending_bytes < self.high_water:
            self._paused = False
            self.pause(False)

    def _write_failed(self, reason: Failure) -> None:
        self._writing = None
        self._failed = reason
        self._drop_pending()

    def _take_pending(self) -> list[memoryview]:
        """Every byte not yet handed to the writer, in order; none kept after."""
        batches = self._full
        if self._filling is not None and self._filled:
            batches.append(memoryview(self._filling)[: self._filled])
        self._drop_pending()
        return batches

    def _drop_pending(self) -> None:
        self._full, self._filling, self._filled, self._pending_bytes = [], None, 0, 0

    def finish(self) -> Deferred[None]:
        """Write what is left and put the file in place."""
        self._finishing = True
        waiting = self._writing if self._writing is not None else succeed(None)

        def complete(_: object) -> Deferred[None]:
            if self._failed is not None:
                failed = self._failed
                return self.abort().addCallback(lambda _: failed)
            return self.run_in_thread(self._commit, self._take_pending())

        return waiting.addCallback(complete)

    def _commit(self, chunks: list[memoryview]) -> None:
        assert self._file is not None
        assert self._folder is not None
        try:
            _write_all(self._file.fileno(), chunks)
            self._file.close()
            os.replace(
                self.temporary.name,
                self.target.name,
                src_dir_fd=self._folder,
                dst_dir_fd=self._folder,
            )
        except OSError:
            self._discard()
            raise
        self._close_folder()

    def abort(self) -> Deferred[None]:
        """Forget the upload: the target keeps what it had."""
        self._finishing = True
        self._drop_pending()
        waiting = self._writing if self._writing is not None else succeed(None)
        return waiting.addBoth(lambda _: self.run_in_thread(self._discard))

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._folder is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temporary.name, dir_fd=self._folder)
        self._close_folder()

    def _close_folder(self) -> None:
        folder, self._folder = self._folder, None
        if folder is not None:
            os.close(folder)


def _write_all(fd: int, chunks: list[memoryview]) -> None:
    """Write C{chunks} in order with as few C{writev} calls as the kernel allows."""
    views = [memoryview(chunk) for chunk in chunks if chunk]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if written:
            views[0] = views[0][written:]
