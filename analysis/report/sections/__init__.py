"""The report's sections, one module per dashboard view they mirror.

Each ``*_section`` function takes the ``ReportContext`` and returns a ``Section`` (figures, tables, text and
what is missing), computed with the functions the pages call:

    overview.py     every downstream score as small multiples (the Overview page)
    divergence.py   loss and downstream, divergence windows, matched loss, predictor ranking (Divergence, Compare)
    forecast.py     a forecast backtest per run (the Forecast page)
    signals.py      the flatness and pathway metric families (the Geometry and Pathways pages)
    cache.py        runs and settings, cached results, provenance
    summary.py      the findings, the summary page and the Not computed box
"""
