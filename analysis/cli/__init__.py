"""The command line's commands, one module per concept; ``analysis/__main__.py`` assembles their parser.

- ``common``: progress bars, printing a frame, registering a loaded run, comma-separated lists
- ``runs``: add-run, runs, query, migrate
- ``demo``: demo
- ``statistics``: windows, rank, forecast
- ``jobs``: eval, worker, jobs
- ``exchange``: import-evals, export, import-cache
- ``metric``: metric
- ``report``: report
"""
