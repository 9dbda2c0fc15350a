"""``python -m aioipc``: a short demo with real worker processes (see ``aioipc._demo``).

The demo lives in an importable module: processes started with spawn or forkserver cannot import
functions from a ``__main__`` module run with ``-m``.
"""

from ._demo import run

if __name__ == "__main__":
    run()
