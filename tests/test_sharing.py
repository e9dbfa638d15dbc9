"""usclip.sharing: a run saved as a folder and loaded in one line, offline Hub load and push, usclip export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from usclip.cli import main as cli_main
from usclip.data import Preprocessing
from usclip.models import register_model_configs
from usclip.sharing import load_pretrained, push_to_hub, save_pretrained
from usclip.sharing.card import RESEARCH_USE_WARNING
from usclip.sharing.layout import FOLDER_FILES, SharingError
from usclip.tasks import ClassificationTask, SegmentationTask, load_task

REPO = Path(__file__).parents[1]
#: non-default settings, so that a folder that forgets them loads a task that prepares images otherwise
PREPROCESSING = Preprocessing(image_size=64, crop="none", colour="replace")
METRICS = {"dice": 0.8125, "dice_std": 0.0625, "iou": 0.6875, "num_images": 7, "metric_protocol": "strict"}
DATA = {"root": "data/busi_like", "image_size": 64, "batch_size": 4, "crop": "none"}


def tiny_task(cls: type = SegmentationTask, adapter: str | None = "mona", seed: int = 3, **kw: Any) -> Any:
    """A tiny task whose every trainable tensor is moved off its initialisation (LoRA's B starts at zero)."""
    torch.manual_seed(seed)
    args = {"model_name": "usclip-test-vit", "layers": [1, 3], "image_size": 64, "embed_dim": 8, "adapter": adapter}
    task = cls(**(args | {"pretrained": None} | kw))
    with torch.no_grad():
        for p in task.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    task.preprocessing = PREPROCESSING
    task.label_names = ["benign", "malignant"]
    return task.eval()


def write_run(task: Any, run_dir: Path, metrics: dict[str, Any] | None = METRICS) -> Path:
    """A run directory as ``usclip fit`` leaves it: checkpoints/best.ckpt (written by the task's hooks), results/."""
    checkpoint: dict[str, Any] = {
        "state_dict": task.state_dict(),
        "hyper_parameters": dict(task.hparams),  # the class: the usclip_task entry on_save_checkpoint adds
        "datamodule_hyper_parameters": DATA | {"_class_path": "usclip.data.SegmentationDataModule"},
        "pytorch-lightning_version": L.__version__,
    }
    task.on_save_checkpoint(checkpoint)
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, run_dir / "checkpoints" / "best.ckpt")
    if metrics is not None:
        (run_dir / "results").mkdir()
        (run_dir / "results" / "test_metrics.json").write_text(json.dumps(metrics))
    return run_dir


def scan() -> np.ndarray:
    """A non-square (48 x 80) grey scan with a bright blob off-centre: transposes and scale bugs show."""
    yy, xx = np.mgrid[0:48, 0:80]
    image = 40 + 60 * xx / 80 + 150 * (((yy - 15) / 8.0) ** 2 + ((xx - 55) / 14.0) ** 2 < 1)
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local open_clip checkpoint of the tiny model: the path real pretrained weights take."""
    register_model_configs()
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    torch.save(open_clip.create_model("usclip-test-vit").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A segmentation run with Mona on random weights and the folder ``save_pretrained`` made of it."""
    root = tmp_path_factory.mktemp("share")
    run = write_run(tiny_task(), root / "runs" / "seg" / "version_0")
    return run, save_pretrained(run, root / "model")


# ----------------------------------------------------------------- folder round trip
def test_folder_round_trips_a_random_weight_run_exactly(shared):
    run, folder = shared
    original = load_task(run)
    loaded = load_pretrained(folder)

    assert sorted(p.name for p in folder.iterdir()) == sorted(FOLDER_FILES)
    assert type(loaded) is SegmentationTask and not loaded.training
    assert loaded.preprocessing == PREPROCESSING != Preprocessing(image_size=64)
    assert loaded.label_names == ["benign", "malignant"]
    want, got = original.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)  # random backbone, Mona and head: every tensor
    a, b = original.predict_image(scan()), loaded.predict_image(scan())
    assert a.size == b.size == (48, 80)
    assert a.mask.any() and not a.mask.all()  # a prediction that can differ
    np.testing.assert_array_equal(b.mask, a.mask)
    np.testing.assert_array_equal(b.probabilities, a.probabilities)


def test_config_rebuilds_the_task_class_and_hyperparameters(shared):
    _, folder = shared
    config = json.loads((folder / "config.json").read_text())
    assert config["task_class"] == "usclip.tasks.segmentation.SegmentationTask"
    init = config["init_args"]
    assert (init["adapter"], init["layers"], init["embed_dim"], init["pretrained"]) == ("mona", [1, 3], 8, None)
    assert not any(k.startswith("_") for k in init)  # no Lightning / jsonargparse bookkeeping
    assert config["backbone"]["stored"] is True
    assert config["input"]["shape"] == ["batch", 3, 64, 64]
    assert json.loads((folder / "preprocessing.json").read_text()) == PREPROCESSING.to_dict()


def test_model_card_has_front_matter_metrics_data_and_the_warning(shared):
    from huggingface_hub import ModelCard

    _, folder = shared
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "usclip" and card.data.pipeline_tag == "image-segmentation"
    assert card.data.license == "apache-2.0" and "mona" in card.data.tags
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["dice"] == 0.8125 and results["iou"] == 0.6875 and "num_images" not in results
    assert "| dice | 0.8125 ± 0.0625 |" in card.text and "| num_images | 7 |" in card.text
    assert "root: data/busi_like" in card.text  # the training data
    assert "adapter: mona" in card.text  # the config
    readme = (REPO / "README.md").read_text()
    assert RESEARCH_USE_WARNING in readme and RESEARCH_USE_WARNING in card.text


# ----------------------------------------------------------------- the frozen backbone
def test_tag_like_backbone_is_left_out_refetched_and_checked(weights_file, tmp_path):
    """backbone='never' on weights with a source: only adapters and head are stored; other weights are refused."""
    weights = tmp_path / "tiny.pt"
    shutil.copy(weights_file, weights)
    task = tiny_task(ClassificationTask, "lora", pretrained=str(weights))
    folder = save_pretrained(task, tmp_path / "m", backbone="never")
    stored = load_file(folder / "model.safetensors")
    assert "encoder.visual.conv1.weight" not in stored
    assert not any(k.startswith("encoder.") and "lora_" not in k for k in stored)
    assert any("lora_B" in k for k in stored) and any(k.startswith("head.") for k in stored)

    x = torch.rand(3, 3, 64, 64)
    torch.testing.assert_close(load_pretrained(folder)(x), task(x), rtol=0, atol=0)

    torch.manual_seed(2)
    torch.save(open_clip.create_model("usclip-test-vit").state_dict(), weights)  # other weights, same name
    with pytest.raises(SharingError, match="differs from the one"):
        load_pretrained(folder)


def test_local_file_backbone_is_stored_and_loads_without_the_file(weights_file, tmp_path):
    weights = tmp_path / "tiny.pt"
    shutil.copy(weights_file, weights)
    task = tiny_task(pretrained=str(weights))
    folder = save_pretrained(task, tmp_path / "m")  # auto: a colleague has no copy of the file
    weights.unlink()
    config = json.loads((folder / "config.json").read_text())
    assert config["backbone"]["stored"] and config["init_args"]["pretrained"] is None
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(load_pretrained(folder)(x), task(x), rtol=0, atol=0)


# ----------------------------------------------------------------- the Hub, offline
def _hub_cache(cache: Path, repo: str, folder: Path, commit: str = "0" * 40) -> None:
    """A Hugging Face cache holding ``repo`` at ``main`` as ``snapshot_download`` lays it out."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(folder, base / "snapshots" / commit)


def test_load_from_hub_reads_the_cache_offline(shared, tmp_path, monkeypatch):
    from huggingface_hub import constants

    run, folder = shared
    _hub_cache(tmp_path / "hub", "lab/busi-seg", folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # not a byte from the network
    task = load_pretrained("hf-hub:lab/busi-seg")
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(task(x), load_task(run)(x), rtol=0, atol=0)
    with pytest.raises(SharingError, match=r"could not get 'hf-hub:lab/other'.*HF_HUB_OFFLINE"):
        load_pretrained("hf-hub:lab/other")
    with pytest.raises(SharingError, match="expected hf-hub:owner/name"):
        load_pretrained("hf-hub:just-a-name")


class _RecordingApi:
    """Stands in for ``huggingface_hub.HfApi``: records what would be created and uploaded."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def __init__(self, token: str | None = None) -> None:
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kw: Any) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def upload_folder(self, folder_path: str, repo_id: str, **kw: Any) -> Any:
        from huggingface_hub.utils import filter_repo_objects

        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        kept = sorted(filter_repo_objects(files, ignore_patterns=kw.get("ignore_patterns")))
        self.calls.append(("upload_folder", {"repo_id": repo_id, "files": kept, **kw}))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture
def recorder(monkeypatch) -> type[_RecordingApi]:
    import huggingface_hub

    _RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingApi)
    return _RecordingApi


def test_push_uploads_the_folder_files(shared, tmp_path, recorder):
    _, folder = shared
    copy = shutil.copytree(folder, tmp_path / "m")
    (copy / ".model.safetensors.tmp").write_text("left by an interrupted save")
    push_to_hub(copy, "hf-hub:lab/busi-seg", private=True)
    kinds = [k for k, _ in recorder.calls]
    assert kinds == ["init", "create_repo", "upload_folder"]
    created, uploaded = recorder.calls[1][1], recorder.calls[2][1]
    assert created["repo_id"] == "lab/busi-seg" and created["private"] is True and created["exist_ok"] is True
    assert uploaded["repo_id"] == "lab/busi-seg" and uploaded["files"] == sorted(FOLDER_FILES)
    with pytest.raises(SharingError, match=r"no config\.json"):
        push_to_hub(tmp_path, "lab/x")  # not a pretrained folder


# ----------------------------------------------------------------- usclip export
def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["export", *args])
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


def test_cli_exports_and_pushes(shared, tmp_path, capsys, recorder):
    run, _ = shared
    code, out, err = _cli([str(run), "--out", str(tmp_path / "m"), "--push-to-hub", "lab/busi-seg"], capsys)
    assert code == 0, err
    assert f"wrote {tmp_path / 'm'}" in out and "pushed" in out and "lab/busi-seg/commit/abc" in out
    assert recorder.calls[-1][1]["files"] == sorted(FOLDER_FILES)
    assert "hf-hub:lab/busi-seg" in (tmp_path / "m" / "README.md").read_text()  # the card's usage snippet
    # a shared folder is a source too (e.g. to add an ONNX file later): the same weights come out
    code, _, err = _cli([str(tmp_path / "m"), "--out", str(tmp_path / "again")], capsys)
    assert code == 0, err
    first, again = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing_run", "--out", "{tmp}/m"], "'missing_run' does not exist"),
        (["{run}", "--out", "{folder}"], "already holds model.safetensors"),
        (["{run}", "--out", "{tmp}/m", "--format", "onnx", "--push-to-hub", "a/b"], "add --format folder"),
        (["{run}", "--out", "{tmp}/m", "--push-to-hub", "no-owner"], "expected owner/name"),
        (["{run}", "--out", "{tmp}/m", "--format", "pdf"], "invalid choice: 'pdf'"),
        (["{run}"], "the following arguments are required: --out"),
    ],
)
def test_cli_errors_are_one_line(shared, tmp_path, capsys, args, message):
    run, folder = shared
    argv = [a.format(tmp=tmp_path, run=run, folder=folder) for a in args]
    code, _, err = _cli(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("usclip: error: ") and message in err, err


def test_load_refuses_what_is_not_a_shared_folder(shared, tmp_path):
    run, folder = shared
    with pytest.raises(SharingError, match=r"a run directory: load it with usclip\.tasks\.load_task"):
        load_pretrained(run)
    bad = shutil.copytree(folder, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"task_class": "os.system"}))
    with pytest.raises(SharingError, match="not a usclip task class"):
        load_pretrained(bad)
