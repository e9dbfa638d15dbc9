"""The model card (``README.md``) of a shared model, in the Hugging Face format: YAML front matter and Markdown.

The front matter is written by ``huggingface_hub``'s ``ModelCardData`` (license, library, tags, pipeline tag and
the test metrics as a ``model-index``), so the Hub shows it as it shows any model's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from usclip import __version__

#: the warning of usclip's README.md, repeated on every card (tests check the two agree)
RESEARCH_USE_WARNING = (
    "> **Research use only.** usclip is research software. It is not a medical device, has not been validated for\n"
    "> clinical use, and must not be used to diagnose, treat or triage patients."
)

_PIPELINE_TAGS = {"segmentation": "image-segmentation", "classification": "image-classification"}
#: metrics shown on the card, in this order, when the run has them
_METRIC_ORDER = ("dice", "iou", "hd95", "asd", "accuracy", "balanced_accuracy", "auc", "f1", "precision", "recall")


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None).rstrip()


def _metrics_table(metrics: Mapping[str, Any]) -> tuple[str, list[tuple[str, float]]]:
    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    names = [k for k in _METRIC_ORDER if k in scalars] + sorted(
        k for k in scalars if k not in _METRIC_ORDER and not k.endswith("_std")
    )
    rows = ["| metric | value |", "|---|---|"]
    shown: list[tuple[str, float]] = []
    for k in names:
        std = scalars.get(f"{k}_std")
        value = f"{scalars[k]:.4f}" + (f" ± {std:.4f}" if std is not None and k != "num_images" else "")
        if k == "num_images":
            value = str(int(scalars[k]))
        rows.append(f"| {k} | {value} |")
        if k != "num_images":
            shown.append((k, scalars[k]))
    extra = {k: v for k, v in metrics.items() if isinstance(v, str)}
    note = "".join(f"\n\n{k}: `{v}`" for k, v in extra.items())
    return "\n".join(rows) + note, shown


def model_card(
    config: Mapping[str, Any],
    *,
    metrics: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    data_class: str | None = None,
    repo: str | None = None,
    name: str | None = None,
) -> str:
    """The ``README.md`` of a pretrained folder.

    Args:
        config: the folder's ``config.json`` content.
        metrics: the run's ``results/test_metrics.json`` (``None``: the card says the run was not tested).
        data: the DataModule's init arguments of the training run.
        data_class: the DataModule's class path.
        repo: the Hub id (``owner/name``) for the usage snippet; ``None``: a folder path.
        name: the model's name (title, ``model-index``); ``None``: the repository's name, or ``usclip-model``.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    init = config["init_args"]
    task = config["task"]
    backbone = config["backbone"]
    name = name or (repo or "usclip-model").split("/")[-1]
    eval_results = None
    table, shown = _metrics_table(metrics) if metrics else ("", [])
    dataset = str((data or {}).get("root") or "unknown")
    if shown:
        eval_results = [
            EvalResult(
                task_type=_PIPELINE_TAGS[task],
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split="test",
                metric_type=k,
                metric_value=v,
            )
            for k, v in shown
        ]
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="usclip",
        pipeline_tag=_PIPELINE_TAGS.get(task),
        tags=["usclip", "ultrasound", "medical-imaging", "open_clip", task]
        + ([str(init["adapter"])] if init.get("adapter") else []),
        model_name=name,
        eval_results=eval_results,
    )
    source = f"hf-hub:{repo}" if repo else "path/to/this/folder"
    adapter = init.get("adapter") or "no"
    pretrained = backbone.get("pretrained")
    weights = "random weights" if pretrained is None else f"weights `{pretrained}`"
    stored = (
        "stored in `model.safetensors`"
        if backbone.get("stored")
        else f"not stored: fetched by its tag `{pretrained}` when the model loads, checked against the SHA-256 in "
        "`config.json`"
    )
    body = f"""
# {name}

A usclip {task} model: the `{backbone.get("model_name")}` image encoder ({weights}) with {adapter} adapter and the
`{init.get("head", "paper")}` head; {init.get("num_classes")} classes, {init.get("image_size")} px input. Trained with
[usclip](https://arxiv.org/abs/2506.08849) {config.get("usclip_version", __version__)}.

{RESEARCH_USE_WARNING}

## Usage

```python
from usclip.sharing import load_pretrained

task = load_pretrained("{source}")  # eval mode
pred = task.predict_image("scan.png")  # PNG/JPEG/TIFF/DICOM path, numpy array or PIL image
```

`pred.mask` and `pred.probabilities` are at the image's original size (classification: `pred.probabilities`,
`pred.label`). The crop, resize and colour settings of training are in `preprocessing.json` and applied by
`predict_image`. The ONNX / `torch.export` files, when present, take the preprocessed batch (see usclip's
docs/sharing.md).

## Test metrics

{table if table else "The run was not tested (no results/test_metrics.json)."}

## Training data

{f"`{data_class}`:" if data_class else "DataModule arguments:"}

```yaml
{_yaml(dict(data)) if data else "# not recorded (the model was saved from a task, not from a run)"}
```

## Config

`{config["task_class"]}` with these arguments (`config.json`):

```yaml
{_yaml(init)}
```

The frozen backbone is {stored}.

## Files

- `model.safetensors`: the weights
- `config.json`: task class, init arguments, backbone source, input and output
- `preprocessing.json`: crop, resize and colour settings
- `README.md`: this card
"""
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    return str(card)
