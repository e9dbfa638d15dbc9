"""A small web page for one's own scans: upload an image, see the overlay, class probabilities and lesion area.

``usclip app RUN_DIR`` serves it (docs/app.md). From Python::

    from usclip.app import build_app, launch_options
    from usclip.tasks import load_task

    build_app(load_task("runs/busi_seg/version_0")).launch(**launch_options())

Gradio is imported only when a page is built (``pip install "usclip[app]"``); :mod:`usclip.app.analysis`
computes what the page shows without it.
"""

from usclip.app.analysis import ACCEPTED_SUFFIXES, Analysis, analyse, lesion_area_mm2
from usclip.app.page import RESEARCH_USE, build_app, launch_options, serve

__all__ = [
    "ACCEPTED_SUFFIXES",
    "RESEARCH_USE",
    "Analysis",
    "analyse",
    "build_app",
    "launch_options",
    "lesion_area_mm2",
    "serve",
]
