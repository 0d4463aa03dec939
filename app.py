"""Streamlit entry point: page config, the shared sidebar, and navigation over pages/.

Run with ``streamlit run app.py -- --db PATH`` (default data/cache.duckdb); ``make run``
does that on the embedded demo.
"""

from __future__ import annotations

import streamlit as st

from pages import _state

st.set_page_config(page_title="Checkpoint divergence", page_icon=":material/query_stats:", layout="wide")

PAGES = [
    st.Page("pages/runs.py", title="Runs", icon=":material/folder_open:", url_path="runs", default=True),
]

navigation = st.navigation(PAGES)
_state.sidebar()
navigation.run()
