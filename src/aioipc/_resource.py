"""The life cycle every aioipc object shares: ``close()``, ``aclose()``, ``async with``, and a
``ResourceWarning`` when the process that made it lets it go unclosed."""

from __future__ import annotations

import os
import warnings
from typing import TypeVar

from ._exceptions import ClosedResourceError

__all__ = ["AsyncResource"]

_R = TypeVar("_R", bound="AsyncResource")


class AsyncResource:
    """``close()`` (sync, idempotent), ``aclose()`` and ``async with``; use after close raises
    :class:`aioipc.ClosedResourceError`. Subclasses implement :meth:`close` and set ``_closed``.

    An object left unclosed warns with ``ResourceWarning`` when it is collected, in the process
    that made it (``_owner_pid``) only: copies that reached other processes (unpickled, or
    inherited by a forked child) belong to the object's owner, who closes its own.
    """

    _closed: bool
    #: The process that warns if this object is collected unclosed (-1: none).
    _owner_pid: int = -1

    def close(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close it, as :meth:`close` does.

        **Cancellation**: none needed; it closes at once, without waiting.
        """
        self.close()

    async def __aenter__(self: _R) -> _R:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and self._owner_pid == os.getpid():
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"{self!r} was closed in this process")
