"""Joining a Ray cluster that has token authentication on: one clear line instead of Ray's 20 s of retries.

A Ray client is let in only with ``RAY_AUTH_MODE=token`` and the cluster's token, found (in this order) in
``RAY_AUTH_TOKEN``, in the file named by ``RAY_AUTH_TOKEN_PATH``, or in ``~/.ray/auth_token`` (where
``ray get-auth-token --generate`` puts it on the head). Without them ``ray.init(address=HOST:PORT)`` retries
for about 20 s and raises a bare ``ConnectionError("Failed to connect to Ray cluster ...")``; with
``RAY_AUTH_MODE=token`` and no token found, Ray aborts the process in C++. :func:`refusal` asks the cluster's
GCS once, before ``ray.init``, and returns the one line to print; :func:`refusal_in` reads a refusal out of
an exception that ``ray.init`` raised anyway. ``ray job submit`` jobs inherit the head's ``RAY_AUTH_MODE`` and
``HOME``, so they pass this check without any setting.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket

FIX = ("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the token in the head's ~/.ray/auth_token> "
       "(or RAY_AUTH_TOKEN_PATH=<a file holding it>)")
_GCS_ADDRESS = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[\w.\-]+):(?P<port>\d+)$")
_AUTH_MARKERS = ("InvalidAuthToken", "authentication token", "Unauthenticated")


def _mode() -> str:
    return os.environ.get("RAY_AUTH_MODE", "").strip().lower()


def _token_source() -> str:
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}"
    return os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def _refused(address: str) -> str:
    mode = _mode()
    if mode != "token":
        shown = f"RAY_AUTH_MODE={mode}" if mode else "RAY_AUTH_MODE is unset"
        return (f"the Ray cluster at {address} requires its authentication token and none was sent "
                f"({shown}): {FIX}")
    return (f"the Ray cluster at {address} refused the authentication token from {_token_source()}: "
            "set RAY_AUTH_TOKEN to the token in the head's ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH to a copy of "
            "that file)")


def _missing_token() -> str | None:
    """With RAY_AUTH_MODE=token: why no token can be sent (None when one is found)."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    try:
        if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
            return None
        why = ("no token was found (RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH are unset and "
               f"{_token_source()} does not exist)")
    except AuthenticationError as exc:  # e.g. RAY_AUTH_TOKEN_PATH names a missing or empty file
        why = str(exc).split(". ")[0]
    return f"RAY_AUTH_MODE=token but {why}: set RAY_AUTH_TOKEN=<the token in the head's ~/.ray/auth_token> " \
           "(or RAY_AUTH_TOKEN_PATH=<a file holding it>)"


@contextlib.contextmanager
def _quiet_fd2():
    """Ray's C++ client logs a warning line to fd 2 on a refused call; the caller prints its own line."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def refusal(address: str | None) -> str | None:
    """One line saying why the cluster at ``address`` (``HOST:PORT`` of its GCS) refuses this process for
    its authentication token, or None when it lets it in, has authentication off, cannot be reached (then
    ``ray.init`` reports that itself) or ``address`` is not a ``HOST:PORT`` (``auto``, ``local``, ``ray://``)."""
    m = _GCS_ADDRESS.match((address or "").strip())
    if not m:
        return None
    if _mode() == "token":
        missing = _missing_token()
        if missing:
            return missing
    host = m.group("host").strip("[]")
    try:
        socket.create_connection((host, int(m.group("port"))), timeout=5).close()
    except OSError:
        return None
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        with _quiet_fd2():
            client = GcsClient(address=address.strip())
        del client
    except AuthenticationError:
        return _refused(address.strip())
    except Exception:  # anything else (a GCS still starting, ...) is ray.init's to report
        return None
    return None


def refusal_in(exc: BaseException, address: str) -> str | None:
    """The one line for an exception (or its causes) that is Ray refusing the token, else None."""
    seen = 0
    while exc is not None and seen < 10:
        if type(exc).__name__ == "AuthenticationError" or any(m in str(exc) for m in _AUTH_MARKERS):
            return (_mode() == "token" and _missing_token()) or _refused(address)
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None
