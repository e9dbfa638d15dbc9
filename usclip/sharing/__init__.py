"""Sharing trained models: a folder a colleague loads in one line, the Hugging Face Hub, torch.export and ONNX.

- :func:`save_pretrained` writes a trained task as a folder: ``model.safetensors`` (only the weights that cannot be
  rebuilt), ``config.json`` (task class and init arguments), ``preprocessing.json`` and a model card ``README.md``.
- :func:`load_pretrained` reads such a folder, or ``hf-hub:owner/name`` from the Hugging Face Hub, back into a task
  in eval mode.
- :func:`push_to_hub` uploads a folder with ``huggingface_hub``.
- :func:`export_torch` and :func:`export_onnx` write the inference network (preprocessed image batch -> logits) as
  a ``torch.export`` program or an ONNX model.

See docs/sharing.md. This package imports :mod:`usclip.tasks` and :mod:`usclip.data`; they never import it.
"""

from usclip.sharing.export import InferenceModel, export_onnx, export_torch
from usclip.sharing.folder import load_pretrained, save_pretrained
from usclip.sharing.hub import push_to_hub
from usclip.sharing.layout import SharingError

__all__ = [
    "InferenceModel",
    "SharingError",
    "export_onnx",
    "export_torch",
    "load_pretrained",
    "push_to_hub",
    "save_pretrained",
]
