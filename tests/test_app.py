"""The web page (`usclip app`, usclip.app): numbers shown, the CLI, and the page driven in a real headless browser.

The browser tests drive Debian's chromium through playwright's Python API. Without chromium or playwright they skip
with the reason, unless ``USCLIP_REQUIRE_BROWSER=1`` (set by ``.ci/run``), which makes them fail naming what to
install: CI cannot pass without having run them.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import numpy as np
import pytest
from PIL import Image

from usclip.app import analysis as app_analysis
from usclip.app.analysis import Analysis, analyse, check_upload
from usclip.data.synthetic import generate_sample

REPO_ROOT = Path(__file__).resolve().parents[1]
BROWSER_REQUIRED = os.environ.get("USCLIP_REQUIRE_BROWSER", "") not in ("", "0")
PAGE_TIMEOUT_MS = 20_000
# Gradio's queue summarises its own (local) event statistics with pandas calls that pandas 3 deprecates
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


# ---------------------------------------------------------------------------------------------------- the tasks
class _FakePrediction:
    def __init__(self, image: np.ndarray, kind: str) -> None:
        self.size = image.shape[:2]
        self._image = image
        if kind == "segmentation":
            self.mask = image > 128
            self.probabilities = np.stack([~self.mask, self.mask]).astype(np.float32)
            self.label = self.label_name = None
        else:
            self.mask = None
            self.probabilities = np.array([0.25, 0.75], dtype=np.float32)
            self.label, self.label_name = 1, "malignant"

    def overlay(self) -> np.ndarray:
        rgb = np.repeat(self._image[..., None], 3, axis=2)
        if self.mask is not None:
            rgb[self.mask] = (255, 0, 0)
        return rgb


class _FakeTask:
    def __init__(self, kind: str) -> None:
        self.task = kind
        self.label_names = ["benign", "malignant"]

    def predict_image(self, image: Any) -> _FakePrediction:
        from usclip.data.imageio import read_image

        return _FakePrediction(read_image(image), self.task)


@pytest.fixture(scope="module")
def seg_task() -> Any:
    return _FakeTask("segmentation")


@pytest.fixture(scope="module")
def cls_task() -> Any:
    return _FakeTask("classification")


# ---------------------------------------------------------------------------------------------------- the scans
def _scan(seed: int = 3, size: tuple[int, int] = (150, 230)) -> np.ndarray:
    """A synthetic B-mode scan, H x W with H != W (a transpose or a resize shows)."""
    return generate_sample(seed, 1, size=size).image


@pytest.fixture
def scan_png(tmp_path: Path) -> Path:
    path = tmp_path / "scan.png"
    Image.fromarray(_scan()).save(path)
    return path


def _dicom(path: Path, spacing_cm: tuple[float, float] | None) -> Path:
    """A DICOM scan (120 x 170) with one tissue region covering it; ``spacing_cm``: (dx, dy) in cm."""
    from tests.dicom_files import write_dicom

    pixels = _scan(5, (120, 170))
    return write_dicom(path, pixels, regions=(((0, 0, 169, 119), 1, 1, spacing_cm),))


# ---------------------------------------------------------------------------------------------------- no browser
def test_analyse_segmentation_counts_the_mask_and_has_no_mm2_without_spacing(seg_task: Any, scan_png: Path) -> None:
    a = analyse(seg_task, scan_png)
    pred = seg_task.predict_image(scan_png)
    assert a.size == (150, 230)
    assert a.lesion_pixels == int(pred.mask.sum())
    assert a.spacing is None and a.lesion_mm2 is None
    np.testing.assert_array_equal(a.overlay, pred.overlay())
    assert a.probabilities is None
    assert f"Lesion area: {a.lesion_pixels} pixels" in a.summary()
    assert "230 x 150 pixels (width x height)" in a.summary()
    assert "mm²: unknown" in a.summary()


def test_analyse_dicom_area_in_mm2_uses_row_and_column_spacing(seg_task: Any, tmp_path: Path) -> None:
    # anisotropic: dx 0.02 cm (columns), dy 0.05 cm (rows) -> 0.2 mm x 0.5 mm = 0.1 mm² per pixel
    path = _dicom(tmp_path / "scan.dcm", (0.02, 0.05))
    a = analyse(seg_task, path)
    assert a.spacing == pytest.approx((0.5, 0.2))
    pixels = int(seg_task.predict_image(path).mask.sum())
    assert 0 < pixels == a.lesion_pixels
    assert a.lesion_mm2 == pytest.approx(pixels * 0.1)
    assert f"Lesion area: {pixels * 0.1:.2f} mm²" in a.summary()
    assert "0.5 x 0.2 mm, row x column" in a.summary()


def test_analyse_classification_names_the_classes_in_order(cls_task: Any, scan_png: Path) -> None:
    a = analyse(cls_task, scan_png)
    pred = cls_task.predict_image(scan_png)
    names = app_analysis.class_names(cls_task, 2)
    assert a.probabilities == pytest.approx(dict(zip(names, pred.probabilities.tolist(), strict=True)))
    assert list(a.probabilities) == names
    assert a.label_name == pred.label_name
    assert a.lesion_pixels is None
    assert f"Predicted class: {pred.label_name}" in a.summary()


def test_uploads_of_other_kinds_are_refused_naming_the_file(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a scan")
    with pytest.raises(ValueError, match=r"notes\.txt: files of type '\.txt' are not read; expected one of \.png"):
        check_upload(notes)
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        check_upload(tmp_path / "gone.png")


def test_summary_area_share_and_mm2() -> None:
    a = Analysis(
        name="x.dcm", size=(10, 40), overlay=np.zeros((10, 40, 3), np.uint8), lesion_pixels=20, spacing=(0.5, 0.25)
    )
    assert a.lesion_mm2 == pytest.approx(2.5)
    assert "Lesion area: 20 pixels (5.00% of the image)" in a.summary()
    assert "Lesion area: 2.50 mm²" in a.summary()


# ---------------------------------------------------------------------------------------------------- the CLI
def test_app_help_imports_neither_torch_nor_gradio() -> None:
    code = (
        "import sys\nfrom usclip.cli import main\ntry:\n    main(['app', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'gradio', 'lightning') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "--share {true,false}" in out and "127.0.0.1" in out
    assert out.strip().splitlines()[-1] == "[]"


def test_app_cli_errors_name_the_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from usclip.commands.app import main

    assert main([str(tmp_path / "no_run")]) == 2
    assert f"{tmp_path / 'no_run'} does not exist (expected a run directory or a .ckpt file)" in capsys.readouterr().err
    for bad, message in (
        (["--port", "70000", "x"], "expected a port number from 1 to 65535, got '70000'"),
        (["--share", "maybe", "x"], "expected true or false, got 'maybe'"),
    ):
        with pytest.raises(SystemExit):
            main(bad)
        assert message in capsys.readouterr().err


def test_a_missing_gradio_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from usclip.commands.app import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"")
    assert main([str(ckpt)]) == 2
    assert 'usclip app: the web page needs gradio: pip install "usclip[app]"' in capsys.readouterr().err


def test_launch_options_stay_local_and_private() -> None:
    from usclip.app import launch_options

    opts = launch_options()
    assert opts["server_name"] == "127.0.0.1" and opts["share"] is False
    assert opts["run_history"] is False and opts["ssr_mode"] is False


# ---------------------------------------------------------------------------------------------------- the browser
def _missing(what: str, install: str) -> None:
    message = f"the web page's browser test needs {what}: {install}"
    if BROWSER_REQUIRED:
        pytest.fail(f"{message} (USCLIP_REQUIRE_BROWSER=1: required here)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        import gradio  # noqa: F401
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        _missing(f"gradio and playwright ({err})", "pip install -e '.[dev]'")
    exe = os.environ.get("USCLIP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).is_file():
        _missing(f"chromium (not found at {exe})", "apt-get install chromium (or set USCLIP_CHROMIUM to its path)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _served(task: Any) -> Iterator[str]:
    """The page for ``task`` served in this process (Gradio's server thread) with usclip's launch options."""
    from usclip.app import build_app, launch_options

    app = build_app(task)
    _, url, _ = app.launch(**launch_options(port=_free_port()), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        app.close(verbose=False)


@contextlib.contextmanager
def _page(browser: Any, url: str) -> Iterator[tuple[Any, list[str]]]:
    """A page at ``url`` and the list of every URL it requested."""
    page = browser.new_page()
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        yield page, requested
    finally:
        page.close()


def _upload_and_read_overlay(page: Any, url: str, path: Path) -> np.ndarray:
    """Upload ``path`` on a freshly loaded page (a filled gr.File has no file input left) and read the image shown."""
    page.goto(url)
    page.set_input_files("#scan input[type=file]", str(path))
    img = page.locator("#overlay img")
    img.wait_for(state="visible")
    response = page.request.get(urljoin(url, img.get_attribute("src")))
    assert response.ok, response.status
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def _only_local(requested: list[str]) -> None:
    hosts = {urlparse(u).hostname for u in requested if urlparse(u).scheme in ("http", "https", "ws", "wss")}
    assert hosts == {"127.0.0.1"}, f"the page requested other hosts: {sorted(h for h in hosts if h != '127.0.0.1')}"


def test_page_segmentation_shows_the_overlay_and_area(
    browser: Any, seg_task: Any, scan_png: Path, tmp_path: Path
) -> None:
    pred = seg_task.predict_image(scan_png)
    with _served(seg_task) as url, _page(browser, url) as (page, requested):
        shown = _upload_and_read_overlay(page, url, scan_png)
        assert "Research use only." in page.locator("#research-use").inner_text()
        assert shown.shape == (150, 230, 3)
        np.testing.assert_array_equal(shown, pred.overlay())
        summary = page.locator("#summary")
        summary.get_by_text(f"Lesion area: {int(pred.mask.sum())} pixels").wait_for()
        assert "mm²: unknown" in summary.inner_text()
        # a DICOM file with its spacing: the area in mm² (rows 0.5 mm, columns 0.2 mm)
        dcm = _dicom(tmp_path / "scan.dcm", (0.02, 0.05))
        dpred = seg_task.predict_image(dcm)
        shown = _upload_and_read_overlay(page, url, dcm)
        np.testing.assert_array_equal(shown, dpred.overlay())
        summary.get_by_text(f"Lesion area: {dpred.mask.sum() * 0.1:.2f} mm²").wait_for()
        _only_local(requested)


def test_page_classification_shows_the_probabilities(browser: Any, cls_task: Any, scan_png: Path) -> None:
    pred = cls_task.predict_image(scan_png)
    with _served(cls_task) as url, _page(browser, url) as (page, requested):
        shown = _upload_and_read_overlay(page, url, scan_png)
        np.testing.assert_array_equal(shown, pred.overlay())
        label = page.locator("#probabilities")
        label.get_by_text(pred.label_name).first.wait_for()
        text = label.inner_text()
        for name, p in zip(app_analysis.class_names(cls_task, 2), pred.probabilities.tolist(), strict=True):
            assert name in text and f"{round(p * 100)}%" in text, text
        _only_local(requested)
