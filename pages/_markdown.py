"""Markdown escaping: user-supplied names shown as typed in Streamlit labels, captions and markdown."""

from __future__ import annotations

import re

# Characters that markdown (and Streamlit's labels, captions and st.markdown) give a meaning to.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$])")


def md_text(text: object) -> str:
    """``text`` for a markdown string, label or caption, shown as typed: never a link, image or HTML.

    Run names, paths, task names and error messages come from folders and files a user was handed.
    """
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))
