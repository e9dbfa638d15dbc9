"""The ``usclip`` command: a thin LightningCLI shell over the library (no logic, no defaults here).

``usclip fit|validate|test|predict --config configs/<name>.yaml``; the YAML's ``class_path`` picks the task and the
DataModule (subclass mode for both, like torchgeo's CLI). ``usclip data ...`` (dataset tools), ``usclip report ...``
(result tables) and ``usclip sweep ...`` (manifests of runs) are routed to ``usclip.commands`` before LightningCLI
sees the arguments.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from usclip._resume import prepare_subcommand
from usclip.data.datamodules import BaseDataModule
from usclip.tasks.base import BaseTask


class UsclipCLI(LightningCLI):
    """LightningCLI with usclip's argument links: ``image_size`` and ``num_classes`` are written once, in ``data``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:  # noqa: D102
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size", apply_on="parse")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then resolve ``--ckpt_path last`` and refuse unsafe checkpoints (see ``usclip._resume``)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            prepare_subcommand(subcommand, self.config[subcommand])


DATA_EPILOG = (
    "dataset tools: usclip data check ROOT | usclip data duplicates ROOT (see usclip data --help); "
    "result tables: usclip report RUN_DIR... (see usclip report --help); "
    "captions: usclip captions refine IN.jsonl OUT.jsonl (see usclip captions --help); "
    "the paper's experiments: usclip sweep paper --dry-run (see usclip sweep --help)"
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
    if isinstance(argv, list) and argv[:1] == ["sweep"]:
        from usclip.commands.sweep import main as sweep_main

        raise SystemExit(sweep_main(argv[1:]))
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
