"""The Gradio page: upload a scan, see the overlay, the class probabilities and the lesion area.

Gradio does the web part (upload, page, HTTP server); the numbers come from :func:`usclip.app.analysis.analyse`.
The page is built offline: Gradio's analytics and version check are off (``GRADIO_ANALYTICS_ENABLED=False`` and
``analytics_enabled=False``), the default theme's fonts are served by the local server (no CDN), the server
listens on 127.0.0.1 unless told otherwise, no share link is made unless asked for, the run history in the browser
is off, and uploaded files are deleted from Gradio's cache after an hour and when the server restarts.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from usclip.app.analysis import ACCEPTED_SUFFIXES, Analysis, Predictor, analyse

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger(__name__)

#: the banner at the top of the page
RESEARCH_USE = (
    "**Research use only.** Not a medical device: the predictions are not validated for diagnosis or treatment "
    "and must not be used for clinical decisions. Uploaded scans stay on this computer (nothing is sent out) "
    "and are deleted from the server's cache after an hour."
)
#: the one-line fix for a missing Gradio
INSTALL_HINT = 'the web page needs gradio: pip install "usclip[app]"'
#: Gradio deletes uploads older than this many seconds, checking as often (and on restart)
CACHE_SECONDS = 3600


def import_gradio() -> Any:
    """Import Gradio with its analytics and version check switched off.

    Raises:
        ImportError: naming ``pip install "usclip[app]"`` when Gradio is not installed.
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio at each call: no telemetry, no version check
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return gradio


def _outputs(analysis: Analysis | None, kind: str) -> tuple[Any, ...]:
    """The values of the page's output components for one analysis (``None``: cleared)."""
    if analysis is None:
        return (None, None, "") if kind == "classification" else (None, "")
    if kind == "classification":
        return analysis.overlay, analysis.probabilities, analysis.summary()
    return analysis.overlay, analysis.summary()


def build_app(task: Predictor, title: str = "usclip: one scan") -> gr.Blocks:
    """The page for ``task`` (not launched): ``build_app(task).launch(**launch_options())`` serves it.

    Segmentation tasks show the overlay and the lesion area (pixels, and mm² for DICOM files that give the pixel
    spacing); classification tasks show the scan, the class probabilities (``gr.Label``) and the predicted class.

    Args:
        task: a loaded task (:func:`usclip.tasks.load_task`); its ``task`` attribute (``segmentation`` or
            ``classification``) chooses the outputs.
        title: the browser tab's title and the page's heading.

    Raises:
        ImportError: naming ``pip install "usclip[app]"`` when Gradio is not installed.
        ValueError: for a task whose ``task`` is neither ``segmentation`` nor ``classification``.
    """
    kind = getattr(task, "task", None)
    if kind not in ("segmentation", "classification"):
        raise ValueError(
            f"task: expected a segmentation or classification task (its .task attribute), got "
            f"{type(task).__name__} with task={kind!r}"
        )
    gr = import_gradio()
    from usclip.data.imageio import ImageReadError

    def run(path: str | None) -> tuple[Any, ...]:
        if path is None:
            return _outputs(None, kind)
        try:
            analysis = analyse(task, path)
        except (FileNotFoundError, ImageReadError, ImportError, ValueError) as err:
            log.warning("could not analyse %s: %s", path, err)
            raise gr.Error(str(err)) from err
        log.info("%s: %s", analysis.name, analysis.summary().replace("\n\n", "; "))
        return _outputs(analysis, kind)

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(CACHE_SECONDS, CACHE_SECONDS)) as app:
        gr.Markdown(f"# {title}")
        gr.Markdown(RESEARCH_USE, elem_id="research-use")
        with gr.Row():
            with gr.Column():
                upload = gr.File(
                    label=f"Scan ({', '.join(s.lstrip('.').upper() for s in ACCEPTED_SUFFIXES)})",
                    file_types=list(ACCEPTED_SUFFIXES),
                    type="filepath",
                    elem_id="scan",
                )
            with gr.Column():
                # PNG: lossless, so the page shows the overlay's exact pixels (Gradio's default is WebP)
                overlay = gr.Image(
                    label="Prediction" if kind == "segmentation" else "Scan",
                    type="numpy",
                    format="png",
                    interactive=False,
                    elem_id="overlay",
                )
                outputs = [overlay]
                if kind == "classification":
                    outputs.append(gr.Label(label="Class probabilities", elem_id="probabilities"))
                outputs.append(gr.Markdown(elem_id="summary"))
        upload.change(run, inputs=upload, outputs=outputs)
    return app


def launch_options(host: str = "127.0.0.1", port: int | None = None, share: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``gr.Blocks.launch`` that keep the page local and private.

    Args:
        host: the address to listen on (``0.0.0.0``: every network interface, so other computers can open it).
        port: the port; ``None``: the first free one from 7860 (Gradio's choice).
        share: make a public ``gradio.live`` link through Gradio's servers (needs the internet; the scans then
            pass through a third party's relay).
    """
    return {
        "server_name": host,
        "server_port": port,
        "share": share,
        "ssr_mode": False,  # client-side page: no Node.js server
        "pwa": False,
        "mcp_server": False,
        "run_history": False,  # no scans or results kept in the browser (nor offered to a Hub bucket)
        "enable_monitoring": False,
        "footer_links": ["settings"],
    }


def serve(task: Predictor, host: str = "127.0.0.1", port: int | None = None, share: bool = False) -> None:
    """Serve the page for ``task`` until interrupted (Ctrl+C); prints the page's address (the CLI's output).

    Args:
        task: a loaded task (:func:`usclip.tasks.load_task`).
        host: the address to listen on (see :func:`launch_options`).
        port: the port; ``None``: the first free one from 7860.
        share: make a public ``gradio.live`` link (see :func:`launch_options`).
    """
    if share:
        log.warning("share=True: a public gradio.live link is made; uploaded scans pass through Gradio's servers")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: other computers on the network can open the page and upload scans", host)
    app = build_app(task)
    _, url, share_url = app.launch(**launch_options(host, port, share), prevent_thread_lock=True, quiet=True)
    print(f"usclip app: serving {url} (research use only; Ctrl+C stops)", flush=True)
    if share_url:
        print(f"usclip app: public link {share_url}", flush=True)
    app.block_thread()  # until Ctrl+C, then closes the server
