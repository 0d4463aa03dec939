"""Streamlit entry point: page config, the shared sidebar, and navigation over pages/.

Run with ``streamlit run app.py -- --db PATH`` (default data/cache.duckdb); ``make run``
does that on the embedded demo. Every page has its own URL path (``/runs``, ...) and keeps
its state in the query string, so a link opens exactly the view it was copied from.
"""

from __future__ import annotations

import streamlit as st

from pages import _state

st.set_page_config(page_title="Checkpoint divergence", page_icon=":material/query_stats:", layout="wide")

MAIN_VIEW = "pages/divergence.py"
PAGES = [
    st.Page("pages/divergence.py", title="Divergence", icon=":material/call_split:", url_path="divergence"),
    st.Page("pages/compare.py", title="Compare runs", icon=":material/compare_arrows:", url_path="compare"),
    st.Page("pages/geometry.py", title="Geometry", icon=":material/landscape:", url_path="geometry"),
    st.Page("pages/pathways.py", title="Pathways", icon=":material/alt_route:", url_path="pathways"),
    st.Page("pages/runs.py", title="Runs", icon=":material/folder_open:", url_path="runs"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/play_arrow:", url_path="evaluate"),
    st.Page("pages/jobs.py", title="Jobs", icon=":material/pending:", url_path="jobs"),
]
# Streamlit serves the default page at / instead of at its own path, so / gets a hidden
# copy of the main view and every listed page keeps a stable path of its own.
HOME = st.Page(MAIN_VIEW, title="Home", url_path="home", default=True, visibility="hidden")

navigation = st.navigation([HOME, *PAGES])
_state.sidebar()
navigation.run()
