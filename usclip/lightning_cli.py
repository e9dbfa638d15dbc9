"""``usclip fit|validate|test|predict``: a thin LightningCLI shell over the library (no logic, no defaults here).

``usclip fit|validate|test|predict --config configs/<name>.yaml``; the YAML's ``class_path`` picks the task and the
DataModule (subclass mode for both, like torchgeo's CLI). Imported by :mod:`usclip.cli` only when one of these
subcommands runs: importing Lightning and the tasks takes seconds, which ``usclip --help`` and the argparse
subcommands (``data``, ``report``, ``captions``, ``sweep``) do not pay.
"""

from __future__ import annotations

import logging
import warnings

import lightning as L
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from usclip._resume import prepare_subcommand
from usclip.data.datamodules import BaseDataModule
from usclip.precision import fit_precision
from usclip.run_dirs import check_logger_installed, checkpoint_run, run_dir_of
from usclip.tasks.base import BaseTask

log = logging.getLogger(__name__)


class UsclipSaveConfig(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback`` writing ``config.yaml`` into the run directory of any logger.

    Lightning writes it to ``trainer.log_dir``, which for MLflow or W&B is the bare ``save_dir`` shared by all runs;
    usclip writes it next to ``checkpoints/`` (:func:`usclip.run_dirs.run_dir_of`), where ``usclip report`` reads it.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        loggers = trainer.loggers
        if self.already_saved or not loggers or isinstance(loggers[0], (TensorBoardLogger, CSVLogger)):
            super().setup(trainer, pl_module, stage)  # trainer.log_dir is the run directory: Lightning's own code
            return
        run = run_dir_of(trainer)  # on every process (a broadcast under DDP)
        if trainer.is_global_zero:
            if self.save_to_log_dir and run is not None:
                run.mkdir(parents=True, exist_ok=True)
                with warnings.catch_warnings():  # skip_none, as Lightning passes it (deprecated in jsonargparse 4.49)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self.parser.save(
                        self.config,
                        str(run / self.config_filename),
                        skip_none=False,
                        overwrite=self.overwrite,
                        multifile=self.multifile,
                    )
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def _show_usclip_logs() -> None:
    """Show usclip's INFO messages (where results went, resumed checkpoints) as Lightning shows its own.

    Only when nobody configured logging: an application's or pytest's handlers are left alone.
    """
    logger = logging.getLogger("usclip")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


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
            try:  # before anything is built: a bad --ckpt_path is one line (usclip.cli), never a traceback
                prepare_subcommand(subcommand, self.config[subcommand])
            except (ValueError, OSError) as err:  # UnsafeCheckpointError, no run for `last`, stray SLURM files
                parser.error(str(err), err)
        trainer = (self.config[subcommand] if subcommand else self.config).get("trainer")
        if trainer is not None:
            logger = trainer.get("logger")
            try:  # an uninstalled mlflow/wandb: one clear message (usclip.cli prints it as a configuration error)
                for one in logger if isinstance(logger, list) else [logger]:
                    check_logger_installed(one.get("class_path") if hasattr(one, "get") else None)
            except ModuleNotFoundError as err:
                parser.error(str(err))
            # bf16 only where the hardware has it (usclip.precision)
            trainer.precision, reason = fit_precision(trainer.get("precision"), trainer.get("accelerator"))
            if reason:
                rank_zero_warn(reason)

    def _report_outputs(self, what: str, folders: tuple[str, ...]) -> None:
        """Log one line naming where ``usclip test``/``predict`` wrote, and the run its checkpoint came from."""
        if not self.trainer.is_global_zero:
            return
        # the task looked its run directory up during the run (on every process); asking the trainer again here
        # would be a collective call on rank zero alone under DDP
        cached = getattr(self.model, "__dict__", {}).get("_run_dir_cache")
        if cached is not None:
            run = cached[1]
        elif self.trainer.world_size == 1:
            run = run_dir_of(self.trainer)
        else:
            return
        if run is None:
            return
        written = [str(run / f) for f in folders if (run / f).is_dir()] or [str(run)]
        ckpt = self.trainer.ckpt_path
        source = checkpoint_run(ckpt)
        line = f"usclip {what}: results in {', '.join(written)}"
        if ckpt:
            line += f" (checkpoint {ckpt}"
            if source is not None and source.resolve() != run.resolve():
                line += f", trained in the run {source}; usclip {what} writes a new run and never into that one"
            line += ")"
        log.info(line)

    def after_test(self) -> None:
        """Say where the test results went (``results/``, ``overlays/``) and which run the checkpoint came from."""
        self._report_outputs("test", ("results", "overlays"))

    def after_predict(self) -> None:
        """Say where the predictions went."""
        self._report_outputs("predict", ("predictions",))


EPILOG = (
    "other subcommands: usclip data check|duplicates ROOT, usclip report RUN_DIR..., usclip captions refine IN OUT, "
    "usclip sweep MANIFEST (each with --help)"
)


def run_lightning_cli(args: ArgsType = None, run: bool = True) -> UsclipCLI:
    """Build (and with ``run=True`` run) :class:`UsclipCLI` on ``args`` (``None`` reads ``sys.argv``)."""
    _show_usclip_logs()
    return UsclipCLI(
        BaseTask,
        BaseDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=UsclipSaveConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": EPILOG, "exit_on_error": False},
        args=args,
        run=run,
    )
