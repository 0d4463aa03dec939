"""Checkpoint divergence analysis: the engine behind the dashboard.

Importable without Streamlit. See README.md for the command line (``python -m analysis``).
"""

from __future__ import annotations

__version__ = "0.1.0"
