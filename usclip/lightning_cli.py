"""``usclip fit|validate|test|predict``: a thin LightningCLI shell over the library (no logic, no defaults here).

``usclip fit|validate|test|predict --config configs/<name>.yaml``; the YAML's ``class_path`` picks the task and the
DataModule (subclass mode for both, like torchgeo's CLI). Imported by :mod:`usclip.cli` only when one of these
subcommands runs: importing Lightning and the tasks takes seconds, which ``usclip --help`` and the argparse
subcommands (``data``, ``report``, ``captions``, ``sweep``) do not pay.
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from usclip._resume import prepare_subcommand
from usclip.data.datamodules import BaseDataModule
from usclip.precision import fit_precision
from usclip.tasks.base import BaseTask


class UsclipCLI(LightningCLI):
    """LightningCLI with usclip's argument links: ``image_size`` and ``num_classes`` are written once, in ``data``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:  # noqa: D102
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size", apply_on="parse")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, resolve ``--ckpt_path last``, refuse unsafe checkpoints, and fit bf16 to the hardware.

        See ``usclip._resume`` and ``usclip.precision``: ``bf16-mixed`` on a CPU or GPU without native bfloat16
        becomes ``32-true`` / ``16-mixed`` with one warning.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            prepare_subcommand(subcommand, self.config[subcommand])
        trainer = (self.config[subcommand] if subcommand else self.config).get("trainer")
        if trainer is not None:  # bf16 only where the hardware has it (usclip.precision)
            trainer.precision, reason = fit_precision(trainer.get("precision"), trainer.get("accelerator"))
            if reason:
                rank_zero_warn(reason)


EPILOG = (
    "other subcommands: usclip data check|duplicates ROOT, usclip report RUN_DIR..., usclip captions refine IN OUT, "
    "usclip sweep MANIFEST (each with --help)"
)


def run_lightning_cli(args: ArgsType = None, run: bool = True) -> UsclipCLI:
    """Build (and with ``run=True`` run) :class:`UsclipCLI` on ``args`` (``None`` reads ``sys.argv``)."""
    return UsclipCLI(
        BaseTask,
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": EPILOG, "exit_on_error": False},
        args=args,
        run=run,
    )
