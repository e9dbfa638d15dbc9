"""The web page (`usclip app`, usclip.app): numbers shown, the CLI, and the page driven in a real headless browser.

The browser tests drive Debian's chromium through playwright's Python API. Without chromium or playwright they skip
with the reason, unless ``USCLIP_REQUIRE_BROWSER=1`` (set by ``.ci/run``), which makes them fail naming what to
install: CI cannot pass without having run them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse
from urllib.request import urlopen

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
TINY = {"model_name": "usclip-test-vit", "pretrained": None, "layers": [1, 3], "image_size": 64, "embed_dim": 8}


def _save_run(cls: type, run: Path) -> Path:
    """A run directory holding an untrained tiny ``cls`` (random weights, class names set) as checkpoints/best.ckpt."""
    import lightning as L
    import torch

    torch.manual_seed(0)
    task = cls(**TINY)
    task.label_names = ["benign", "malignant"]
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    trainer.strategy.connect(task)
    trainer.save_checkpoint(run / "checkpoints" / "best.ckpt")
    return run


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from usclip.tasks import SegmentationTask

    return _save_run(SegmentationTask, tmp_path_factory.mktemp("seg"))


@pytest.fixture(scope="module")
def seg_task(seg_run: Path) -> Any:
    from usclip.tasks import load_task

    return load_task(seg_run)


@pytest.fixture(scope="module")
def cls_task(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from usclip.tasks import ClassificationTask, load_task

    return load_task(_save_run(ClassificationTask, tmp_path_factory.mktemp("cls")) / "checkpoints" / "best.ckpt")


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
    """A DICOM scan, 120 x 170, whose one tissue region (x 10-159, y 5-114) gives ``spacing_cm`` = (dx, dy) in cm."""
    from tests.dicom_files import write_dicom

    return write_dicom(path, _scan(5, (120, 170)), regions=(((10, 5, 159, 114), 1, 1, spacing_cm),))


# ---------------------------------------------------------------------------------------------------- no browser
def test_analyse_segmentation_counts_the_mask_and_has_no_mm2_without_spacing(seg_task: Any, scan_png: Path) -> None:
    a = analyse(seg_task, scan_png)
    pred = seg_task.predict_image(scan_png)
    assert a.size == (150, 230)
    assert 0 < a.lesion_pixels == int(pred.mask.sum()) < 150 * 230  # random weights: some pixels, not all
    assert a.lesion_mm2 is None and a.spacings == ()
    np.testing.assert_array_equal(a.overlay, pred.overlay())
    assert a.probabilities is None
    assert f"Lesion area: {a.lesion_pixels} pixels ({100 * a.lesion_pixels / (150 * 230):.2f}% of the image)" in (
        a.summary()
    )
    assert "230 x 150 pixels (width x height)" in a.summary()
    assert "mm²: unknown (no pixel spacing" in a.summary()


def test_analyse_dicom_area_in_mm2_uses_row_and_column_spacing(seg_task: Any, tmp_path: Path) -> None:
    # anisotropic: dx 0.02 cm (columns), dy 0.05 cm (rows) -> 0.5 mm x 0.2 mm = 0.1 mm² per pixel
    path = _dicom(tmp_path / "scan.dcm", (0.02, 0.05))
    a = analyse(seg_task, path)
    pred = seg_task.predict_image(path)
    assert a.size == (120, 170) and a.spacings == (pytest.approx((0.5, 0.2)),)
    pixels = int(pred.mask.sum())
    assert 0 < pixels == a.lesion_pixels
    assert not pred.mask[:5].any() and not pred.mask[:, 160:].any()  # outside the region: background
    assert a.lesion_mm2 == pytest.approx(pixels * 0.1)
    assert f"Lesion area: {pixels * 0.1:.2f} mm² (pixel spacing 0.5 x 0.2 mm, row x column" in a.summary()


def test_lesion_area_mm2_counts_each_region_at_its_own_spacing(tmp_path: Path) -> None:
    from tests.dicom_files import write_dicom
    from usclip.app.analysis import lesion_area_mm2

    # left region: dx 0.01 cm, dy 0.02 cm -> 0.02 mm² per pixel; right region: 0.03 cm square -> 0.09 mm²
    regions = (((0, 0, 29, 39), 1, 1, (0.01, 0.02)), ((30, 0, 49, 39), 1, 1, (0.03, 0.03)))
    path = write_dicom(tmp_path / "two.dcm", np.full((40, 60), 90, np.uint8), regions=regions)
    mask = np.zeros((40, 60), bool)
    mask[0:2, 0:5] = True  # 10 pixels on the left
    mask[10, 30:35] = True  # 5 on the right
    area, spacings = lesion_area_mm2(mask, path)
    assert spacings == (pytest.approx((0.2, 0.1)), pytest.approx((0.3, 0.3)))
    assert area == pytest.approx(10 * 0.02 + 5 * 0.09)
    mask[0, 55] = True  # a lesion pixel outside both regions: no physical size
    assert lesion_area_mm2(mask, path) == (None, spacings)
    assert lesion_area_mm2(mask, tmp_path / "scan.png") == (None, ())


def test_analyse_classification_names_the_classes_in_order(cls_task: Any, scan_png: Path) -> None:
    a = analyse(cls_task, scan_png)
    pred = cls_task.predict_image(scan_png)
    assert list(a.probabilities) == ["benign", "malignant"]
    assert list(a.probabilities.values()) == pytest.approx(pred.probabilities.tolist())
    assert a.label_name == ["benign", "malignant"][int(np.argmax(pred.probabilities))]
    np.testing.assert_array_equal(a.overlay, np.repeat(np.asarray(Image.open(scan_png))[..., None], 3, axis=2))
    assert a.lesion_pixels is None
    assert f"Predicted class: {a.label_name}" in a.summary()


def test_uploads_of_other_kinds_are_refused_naming_the_file(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a scan")
    with pytest.raises(ValueError, match=r"notes\.txt: files of type '\.txt' are not read; expected one of \.png"):
        check_upload(notes)
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        check_upload(tmp_path / "gone.png")


def test_summary_when_the_area_in_mm2_is_unknown() -> None:
    a = Analysis(name="x.dcm", size=(10, 40), overlay=np.zeros((10, 40, 3), np.uint8), lesion_pixels=20)
    assert "Lesion area: 20 pixels (5.00% of the image)" in a.summary()
    a = Analysis(**{**a.__dict__, "spacings": ((0.5, 0.25),)})
    assert "Lesion area in mm²: unknown (lesion pixels outside the regions of spacing 0.5 x 0.25 mm)" in a.summary()


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
def gradio() -> Any:
    try:
        import gradio
    except ImportError as err:
        _missing(f"gradio ({err})", "pip install -e '.[dev]'")
    return gradio


@pytest.fixture(scope="module")
def browser(gradio: Any) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        _missing(f"playwright ({err})", "pip install -e '.[dev]'")
    exe = os.environ.get("USCLIP_CHROMIUM") or shutil.which("chromium")
    if exe is None or not Path(exe).is_file():
        _missing(f"chromium (not set in USCLIP_CHROMIUM, not on PATH: {exe})", "apt-get install chromium")
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


def test_usclip_app_serves_the_run_on_the_port_and_prints_its_address(
    gradio: Any, seg_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from usclip.commands.app import main

    seen: dict[str, Any] = {}

    def fetch_config_and_close(app: Any) -> None:  # instead of waiting for Ctrl+C
        with urlopen(f"{app.local_url}config", timeout=10) as response:
            seen.update(json.load(response))
        app.close(verbose=False)

    monkeypatch.setattr(gradio.Blocks, "block_thread", fetch_config_and_close)
    port = _free_port()
    assert main([str(seg_run), "--port", str(port)]) == 0
    assert capsys.readouterr().out.startswith(f"usclip app: serving http://127.0.0.1:{port}/ (research use only")
    assert seen["analytics_enabled"] is False
    assert any("Research use only." in str(c["props"].get("value")) for c in seen["components"])


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
