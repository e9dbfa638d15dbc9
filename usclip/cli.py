"""The ``usclip`` command: a thin LightningCLI shell over the library (no logic, no defaults here).

``usclip fit|validate|test|predict --config configs/<name>.yaml``; the YAML's ``class_path`` picks the task and the
DataModule (subclass mode for both, like torchgeo's CLI). ``usclip data ...`` (dataset tools) and ``usclip report ...``
(result tables) are routed to ``usclip.commands`` before LightningCLI sees the arguments.
"""

from __future__ import annotations

import sys

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


DATA_EPILOG = (
    "dataset tools: usclip data check ROOT | usclip data duplicates ROOT (see usclip data --help); "
    "result tables: usclip report RUN_DIR... (see usclip report --help); "
    "captions: usclip captions refine IN.jsonl OUT.jsonl (see usclip captions --help)"
)


def main(args: ArgsType = None, run: bool = True) -> UsclipCLI:
    """Run the ``usclip`` command line (``args=None`` reads ``sys.argv``; ``run=False`` only instantiates).

    ``usclip data ...`` and ``usclip report ...`` exit (``SystemExit`` with its exit code), as ``--help`` does.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["data"]:
        from usclip.commands.data import main as data_main

        raise SystemExit(data_main(argv[1:]))
    if isinstance(argv, list) and argv[:1] == ["report"]:
        from usclip.commands.report import main as report_main

        raise SystemExit(report_main(argv[1:]))
    if isinstance(argv, list) and argv[:1] == ["captions"]:
        from usclip.commands.captions import main as captions_main

        raise SystemExit(captions_main(argv[1:]))
    return UsclipCLI(
        BaseTask,
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": DATA_EPILOG},
        args=args,
        run=run,
    )


def console_main() -> None:
    """Entry point of the ``usclip`` console script.

    Console scripts call ``sys.exit(entry())``: returning the CLI object from there would print it and exit with
    status 1 after a successful run, so this wrapper returns nothing.
    """
    main()


if __name__ == "__main__":
    console_main()
