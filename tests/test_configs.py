"""Every shipped YAML under configs/ parses and instantiates (tiny encoder, synthetic root, run=False)."""

from __future__ import annotations

from pathlib import Path

import pytest

from usclip.cli import main
from usclip.tasks import BaseTask

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.name) for c in CONFIGS])
def test_shipped_config_instantiates(config: Path, tmp_path: Path):
    cli = main(
        [
            "--config",
            str(config),
            # no weights can be downloaded here: the tiny architecture with random weights stands in
            "--model.init_args.model_name=usclip-test-vit",
            "--model.init_args.pretrained=null",
            "--model.init_args.layers=[1,2,3]",
            "--data.init_args.image_size=64",
            f"--data.init_args.root={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert isinstance(cli.model, BaseTask)
    assert cli.model.hparams.image_size == 64
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes
    assert any(p.requires_grad for p in cli.model.parameters())
