"""dynascope workbench — Streamlit entry script (``dynascope app`` or ``streamlit run app/main.py``).

Multipage app via ``st.navigation``: Runs (pick / open / upload a run), then one page per
phenomenon or probe family. The selected run lives in the session state (see ``lib.state``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
if str(APP_DIR) not in sys.path:  # pages import the shared helpers as ``lib.*``
    sys.path.insert(0, str(APP_DIR))

import streamlit as st  # noqa: E402
from lib import demos, downloads, state  # noqa: E402

from dynascope.cli import ALLOW_REMOTE_ENV, is_loopback  # noqa: E402

st.set_page_config(page_title="dynascope", page_icon=":material/biotech:", layout="wide")
_address = st.get_option("server.address")  # None only under streamlit's AppTest: app/.streamlit sets it
if _address is not None and not is_loopback(_address) and os.environ.get(ALLOW_REMOTE_ENV) != "1":
    st.error(
        f"This app serves run folders and runs probes, and it was started on `{_address}`, which other "
        "machines can reach; it refuses to serve there unless you choose that explicitly: "
        f"`dynascope app --address {_address}`, or `{ALLOW_REMOTE_ENV}=1` beside `--server.address`."
    )
    st.stop()
downloads.configure_browser()


def _page(file: str, title: str, icon: str, **kwargs: object) -> st.Page:
    return st.Page(APP_DIR / "views" / file, title=title, icon=f":material/{icon}:", **kwargs)


PAGES = {
    "Runs": [
        _page("runs.py", "Runs", "folder_open", default=True),
        _page("compare.py", "Compare runs", "stacked_line_chart"),
    ],
    "Curvature": [
        _page("hessian.py", "Hessian", "landscape"),
        _page("landscape.py", "Landscape", "terrain"),
        _page("edge_of_stability.py", "Edge of stability", "show_chart"),
        _page("gradients.py", "Gradients", "explore"),
    ],
    "Phenomena": [
        _page("grokking.py", "Grokking", "lightbulb"),
        _page("double_descent.py", "Double descent", "ssid_chart"),
        _page("lr_transfer.py", "LR transfer", "tune"),
        _page("neural_collapse.py", "Neural collapse", "target"),
        _page("mode_connectivity.py", "Mode connectivity", "link"),
    ],
}

if demos.auto_generation_enabled():  # the demos start with the app, whichever page is opened first
    try:
        demos.start_generation(state.runs_dir())
    except OSError as exc:  # a read-only runs folder: the Runs page reports it
        st.sidebar.caption(f"Demo runs not generated: {exc}")
page = st.navigation(PAGES)
with st.sidebar:
    st.caption(f"Runs folder: `{state.runs_dir()}`")
state.sidebar_picker()
page.run()
