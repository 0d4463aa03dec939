"""Streamlit entry point: page config, the shared sidebar, and navigation over pages/.

Run with ``streamlit run app.py -- --db PATH`` (default data/cache.duckdb); ``make run``
does that on the embedded demo. Every page has its own URL path (``/runs``, ...) and keeps
its state in the query string, so a link opens exactly the view it was copied from.
"""

from __future__ import annotations

import streamlit as st

from pages import _state

st.set_page_config(**_state.PAGE_CONFIG)

PAGES = [st.Page(script, title=title, icon=icon, url_path=path) for script, title, icon, path in _state.PAGES]
# Streamlit serves the default page at / instead of at its own path, so / gets a hidden
# copy of the main view and every listed page keeps a stable path of its own.
HOME = st.Page(_state.PAGES[0][0], title="Home", url_path="home", default=True, visibility="hidden")

navigation = st.navigation([HOME, *PAGES])
with _state.one_generation_per_run():
    _state.sidebar()
    navigation.run()
