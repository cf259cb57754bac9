"""Shared helpers of the dynascope Streamlit app: run selection, probe execution, downloads, errors.

The app's entry script puts ``app/`` on ``sys.path`` so pages import these as ``lib.<module>``.
Everything that does not need Streamlit (uploads, frames, figures, exports) is plain Python and
tested without a browser.
"""
