"""Sessions for every supported Python, and for lint, types and docs: ``nox -l`` lists them.

``nox -s tests`` runs the test suite on each supported Python found on PATH;
``nox -s tests-3.10 -- tests/test_api.py`` runs some tests on one. ``nox -s lint types docs``
runs the checks that do not depend on the Python version. ``nox -s chaos`` runs the chaos test
(``tests/chaos``), which the default run leaves out.
"""

from __future__ import annotations

import nox

#: Every Python that ``requires-python`` admits and the classifiers name.
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]

nox.options.sessions = ["tests", "lint", "types", "docs"]
nox.options.error_on_missing_interpreters = True
nox.options.reuse_existing_virtualenvs = True


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite (or the tests given after ``--``)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHONS[-1])
def chaos(session: nox.Session) -> None:
    """The chaos test, not part of ``tests``: producer and consumer processes paused and killed at
    random on each event loop, checked for lost, doubled or reordered items and for waits past a
    bound. It prints its seed; ``CHAOS_SEED=N nox -s chaos`` replays it, ``CHAOS_ROUNDS=N`` sets
    the rounds per event loop."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "tests/chaos", "-q", *session.posargs)


@nox.session(python=PYTHONS[-1])
def lint(session: nox.Session) -> None:
    """ruff's lint and format checks."""
    session.install("-e", ".[test]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHONS[0])
def types(session: nox.Session) -> None:
    """mypy --strict, on the oldest supported Python (the configured target)."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "mypy")
    # the helpers of the tooling itself, which import nox and griffe
    session.run("python", "-m", "mypy", "noxfile.py", "docs/_ext")


@nox.session(python=PYTHONS[-1])
def docs(session: nox.Session) -> None:
    """The documentation site in strict mode: a warning or a broken reference fails."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", str(session.create_tmp() + "/site"))
