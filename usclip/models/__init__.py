"""Models: the CLIP image encoder (with adapters) and the task heads.

Importing this package registers usclip's extra open_clip model configs (``usclip-test-vit``,
``usclip-demo-vit``) with ``open_clip.add_model_config``.
"""

from usclip.models.encoder import CLIPEncoder, PretrainedWeightsError, register_model_configs

register_model_configs()

__all__ = ["CLIPEncoder", "PretrainedWeightsError", "register_model_configs"]
