"""Fork safety: what a forked child must forget, registered in one place.

A child made by ``fork`` inherits the parent's memory but not its threads: the bridge's hubs, the
connections' receive state, the process watcher and the event loop's own state describe threads
and waits that do not exist there. Each module registers, with :func:`register`, one function that
resets what it owns; this module runs them, in the order they were registered, from one hook.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from multiprocessing import util

__all__ = ["register"]


class _Hooks(list[Callable[[], None]]):
    """Hooks, in order (a class of its own: multiprocessing holds its after-fork objects weakly)."""

    def run(self) -> None:
        for hook in list(self):
            try:
                hook()
            except Exception:  # as os.register_at_fork does: report it, and run the other hooks
                print(f"Exception ignored in after-fork hook {hook!r}:", file=sys.stderr)
                traceback.print_exc()


_in_every_child = _Hooks()
_in_multiprocessing_children = _Hooks()


def register(hook: Callable[[], None], *, multiprocessing_children_only: bool = False) -> None:
    """Run ``hook()`` in every child this process forks, right after the fork (``os.fork()``,
    multiprocessing's fork start method, a fork server's children).

    With ``multiprocessing_children_only``, run it only in children that multiprocessing starts
    with the fork method, once they are set up (multiprocessing's after-fork hooks): such a child
    never returns into its parent's code, so the hook may undo what only the parent uses.
    """
    if multiprocessing_children_only:
        _in_multiprocessing_children.append(hook)
    else:
        _in_every_child.append(hook)


if sys.platform != "win32":
    os.register_at_fork(after_in_child=_in_every_child.run)
util.register_after_fork(_in_multiprocessing_children, _Hooks.run)
