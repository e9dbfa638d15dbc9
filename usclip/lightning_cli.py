"""``usclip fit|validate|test|predict``: a thin LightningCLI shell over the library (no logic, no defaults here).

``usclip fit|validate|test|predict --config configs/<name>.yaml``; the YAML's ``class_path`` picks the task and the
DataModule (subclass mode for both, like torchgeo's CLI). Imported by :mod:`usclip.cli` only when one of these
subcommands runs: importing Lightning and the tasks takes seconds, which ``usclip --help`` and the argparse
subcommands (``data``, ``report``, ``captions``, ``sweep``) do not pay.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import logging
import re
import warnings
from argparse import ArgumentError
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from usclip._resume import prepare_subcommand
from usclip.data.datamodules import BaseDataModule
from usclip.models.baselines import check_model_installed
from usclip.precision import fit_precision
from usclip.run_dirs import check_logger_installed, checkpoint_run, run_dir_of
from usclip.tasks.base import BaseTask, early_stopping_conflict
from usclip.tasks.prediction import PredictionWriter

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


def _model_name(config: Any) -> str | None:
    """``model.init_args.model_name`` of a parsed configuration, or ``None``."""
    model: Any = config.get("model") if hasattr(config, "get") else None
    init: Any = model.get("init_args") if hasattr(model, "get") else None
    name: Any = init.get("model_name") if hasattr(init, "get") else None
    return name if isinstance(name, str) else None


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
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:  # one line naming the key, the value and the fix (usclip.cli prints it)
            parsers = list(getattr(self, "_subcommand_parsers", {}).values()) or [parser]
            message = explain_parse_error(err, parsers)
            if message is None:
                raise
            parser.error(message, err)
        subcommand = self.config.get("subcommand")
        if subcommand:
            try:  # before anything is built: a bad --ckpt_path is one line (usclip.cli), never a traceback
                prepare_subcommand(subcommand, self.config[subcommand])
            except (ValueError, OSError) as err:  # UnsafeCheckpointError, no run for `last`, stray SLURM files
                parser.error(str(err), err)
        trainer = (self.config[subcommand] if subcommand else self.config).get("trainer")
        if subcommand == "fit":  # before the model is built; the task raises the same at fit (library use)
            _check_early_stopping(parser, self.config[subcommand])
        if trainer is not None:
            logger = trainer.get("logger")
            try:  # an uninstalled mlflow/wandb/smp: one clear message (usclip.cli prints it as a configuration error)
                for one in logger if isinstance(logger, list) else [logger]:
                    check_logger_installed(one.get("class_path") if hasattr(one, "get") else None)
                check_model_installed(_model_name(self.config[subcommand] if subcommand else self.config))
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

    def before_predict(self) -> None:
        """Add a :class:`usclip.tasks.PredictionWriter` (unless the config has one): ``predict_step`` writes nothing.

        ``usclip predict`` runs ``trainer.predict(..., return_predictions=False)`` (``usclip._resume``): the writer
        writes each batch as it comes and nothing is kept, so memory stays flat however many images there are.
        """
        if not any(isinstance(cb, PredictionWriter) for cb in self.trainer.callbacks):  # type: ignore[attr-defined]
            self.trainer.callbacks.append(PredictionWriter())  # type: ignore[attr-defined]

    def after_predict(self) -> None:
        """Say where the predictions went."""
        self._report_outputs("predict", ("predictions",))


def _check_early_stopping(parser: LightningArgumentParser, config: Any) -> None:
    """Refuse an ``EarlyStopping`` in ``trainer.callbacks`` together with ``early_stopping_patience``."""
    model = config.get("model")
    patience = model.get("init_args", {}).get("early_stopping_patience") if hasattr(model, "get") else None
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        cls = _import(str(callback.get("class_path"))) if hasattr(callback, "get") else type(callback)
        if patience is not None and isinstance(cls, type) and issubclass(cls, EarlyStopping):
            parser.error(early_stopping_conflict(patience, cls.__name__))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else ""


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _options_of(cls: Any) -> list[str]:
    """The keys a config may give ``cls``: its dataclass fields, or the parameters of its ``__init__``."""
    if cls is None:
        return []
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    names: list[str] = []
    for klass in cls.__mro__:  # a ``**kwargs`` passes on to the base class: its options count too
        try:
            params = list(inspect.signature(klass.__init__).parameters.values())
        except (TypeError, ValueError):
            break
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def _did_you_mean(word: str, valid: list[str], show: Any = repr) -> str:
    close = difflib.get_close_matches(word, valid, n=1)
    return f" (did you mean {show(close[0])}?)" if close else ""


def explain_parse_error(err: BaseException, parsers: list[LightningArgumentParser]) -> str | None:
    """One line for a parser error: the full key (``model.init_args.adapter``), the value, what is valid, the fix.

    jsonargparse reports nested errors as a chain of exceptions, one per level (``Parser key "model"``, ``Problem
    with given class_path 'usclip.tasks.SegmentationTask'``, ``Parser key "adapter"``, then the innermost cause):
    the chain gives the key path and the class whose options apply; misspelt keys and values get a "did you mean"
    (``difflib.get_close_matches``) over the valid keys of that level or the allowed values.

    Args:
        err: the parser's ``ArgumentError`` (its ``__cause__`` chain is read).
        parsers: the parsers whose options an unrecognised ``--key`` is matched against (the subcommands').

    Returns:
        The message, or ``None`` for an error of another form (its own message is then shown).
    """
    chain, seen = [], set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    path: list[str] = []
    owner: Any = None  # the class whose options the innermost key belongs to
    previous = None
    for link in chain:
        first = _first_line(link)
        if first == previous:
            continue
        previous = first
        if found := re.match(r'Parser key "([^"]+)":', first):
            path.append(found.group(1))
        elif found := re.match(r"Problem with given class_path '([^']+)':", first):
            owner = _import(found.group(1))
            if owner is not None and not dataclasses.is_dataclass(owner):
                path.append("init_args")
    inner = _first_line(chain[-1])
    key = ".".join(path)
    if found := re.fullmatch(r"Option '([^']+)' is not accepted", inner):
        name = found.group(1)
        options = _options_of(owner)
        where = f"{key}.{name}" if key else name
        of = f" of {owner.__name__}" if owner is not None else ""
        hint = _did_you_mean(name, options) or (f"; its options: {', '.join(options)}" if options else "")
        return f"{where}: no such option{of}{hint}"
    if found := re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", inner):
        try:
            choices = list(ast.literal_eval(f"[{found.group(1)}]"))
        except (ValueError, SyntaxError):
            return None
        value = found.group(2)
        nullable = any("NoneType" in str(link) for link in chain[-3:])
        allowed = ", ".join([repr(c) for c in choices] + (["null"] if nullable else []))
        return f"{key}: {value!r} is not one of {allowed}{_did_you_mean(value, [str(c) for c in choices])}"
    if found := re.match(r"module '([\w.]+)' has no attribute '(\w+)'", inner):
        module = importlib.import_module(found.group(1))
        public = [n for n in dir(module) if not n.startswith("_") and isinstance(getattr(module, n), type)]
        hint = _did_you_mean(found.group(2), public, lambda n: f"{found.group(1)}.{n}")
        return f"{key}.class_path: {found.group(1)}.{found.group(2)} does not exist{hint}"
    options = [o for p in parsers for a in p._actions for o in a.option_strings if o.startswith("--")]
    if found := re.match(r"Subcommand '(\w+)' does not accept option '([^']+)'", inner):
        name = found.group(2)
        hint = _did_you_mean(f"--{name}", options, lambda o: o.removeprefix("--"))
        return f"{name}: no such option of `usclip {found.group(1)}` (a key of a --config file){hint}"
    if inner.startswith("unrecognized arguments:"):
        unknown = [w.split("=")[0] for w in inner.split(":", 1)[1].split() if w.startswith("--")]
        if not unknown:
            return None
        hints = [f"{u}{_did_you_mean(u, options, str)}" for u in unknown]
        return f"unrecognized argument{'s' if len(unknown) > 1 else ''} {', '.join(hints)}"
    if key and inner:
        return f"{key}: {inner}"
    return None


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
