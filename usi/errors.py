"""The one exception type a user is meant to see (a one-line message, exit code 2), and the helpers that
keep its messages to one readable line, and what keeps a path a user names from being read as a file."""
import difflib
import os
import stat


class UsageError(Exception):
    """Bad recipe, data, model name or file: the user can fix it from the message alone."""


def one_line(error: Exception) -> str:
    """The message of `error` as one line. An error raised in a DataLoader worker reaches the main
    process with the worker's whole traceback in its message: its last line is the message."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if any("Traceback (most recent call last)" in line for line in lines):
        return shorten(lines[-1].split("Error: ", 1)[-1])
    return shorten(lines[0])


def shorten(line: str, limit: int = 1000) -> str:
    """A line a person reads: a 50 MB value echoed back is cut, with how much was left out."""
    return line if len(line) <= limit else f"{line[:limit]}... ({len(line) - limit} more characters)"


def suggest(word: str, choices) -> str:
    """'; did you mean X?' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


NOT_REGULAR = ((stat.S_ISDIR, "is a directory, not a file"),
               (stat.S_ISFIFO, "is not a regular file (a named pipe)"),
               (stat.S_ISCHR, "is not a regular file (a character device)"),
               (stat.S_ISBLK, "is not a regular file (a block device)"),
               (stat.S_ISSOCK, "is not a regular file (a socket)"))


def file_problem(path) -> str | None:
    """Why `path` cannot be read as a file, in words ("does not exist", "is a directory, not a file", "is not
    a regular file (a named pipe)", ...), or None. Follows links and never opens the path: a named pipe
    would block, /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a link to a file that does not exist" if os.path.islink(path) else "does not exist"
    except OSError as e:  # a loop of links, a name too long, a file used as a folder
        return f"cannot be read ({e.strerror})"
    if stat.S_ISREG(mode):
        return None if os.access(path, os.R_OK) else "cannot be read (permission denied)"
    return next((reason for test, reason in NOT_REGULAR if test(mode)), "is not a regular file")
