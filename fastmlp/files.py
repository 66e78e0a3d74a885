"""Files written whole or not at all: a temporary file beside the target,
fsync, then os.replace. The new file gets the permissions open() would give
it (0o666 less the umask), or those of the file it replaces."""
import contextlib
import errno
import os
import secrets
import stat


def temporary_beside(path, prefix=".fastmlp-"):
    """(fd, name): a new, empty file open for writing in path's directory,
    to be renamed onto path."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):  # (said of path, not of the temporary name)
        raise FileNotFoundError(errno.ENOENT, f"no directory {directory!r} to write into", path)
    while True:
        tmp = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}.tmp")
        try:  # as tempfile.mkstemp, but with open()'s mode rather than 0o600
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    with contextlib.suppress(OSError):  # an existing file keeps its mode
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
    return fd, tmp


def atomic_write(path, parts):
    """Writes the byte strings `parts` to path so that a crash at any moment
    leaves either the old file or the new one, never a mix."""
    path = os.fspath(path)
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_directory(os.path.dirname(os.path.abspath(path)))


def sync_directory(directory):
    """Makes a rename in directory durable (where the system allows)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
