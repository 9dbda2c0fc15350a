"""aioipc's benchmark suite: ``python -m benchmarks`` (``--quick`` for a short run).

Every figure is compared with the synchronous loop on the same channel, measured in the same run;
see ``__main__.py`` for the options and ``_suite.py`` for the cases.
"""
