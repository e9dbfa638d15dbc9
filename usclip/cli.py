"""The ``usclip`` command: a router that imports only what the chosen subcommand needs.

- ``usclip fit|validate|test|predict ...``: the LightningCLI in :mod:`usclip.lightning_cli` (imports Lightning,
  torch and the tasks: seconds).
- ``usclip data|report|captions|sweep|configs|app ...``: argparse commands in :mod:`usclip.commands`, whose
  ``--help`` imports neither torch nor Lightning.
- ``usclip``, ``usclip --help``, ``usclip --version``: answered here, at once.

A configuration error of the LightningCLI subcommands (a misspelt key, a wrong type, weights that cannot be
loaded) is printed as one line ``usclip: error: ...`` naming the cause first; the full parser message follows
only with ``USCLIP_DEBUG=1``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from usclip import __version__

if TYPE_CHECKING:
    from usclip.lightning_cli import UsclipCLI

#: subcommands of LightningCLI (run by usclip.lightning_cli)
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: argparse subcommands: name -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("usclip.commands.data", "dataset tools: usclip data check ROOT, usclip data duplicates ROOT"),
    "report": ("usclip.commands.report", "tables of many runs over seeds, as in the paper (Markdown, CSV)"),
    "captions": ("usclip.commands.captions", "refine report captions with an LLM to CLIP's 77 tokens"),
    "sweep": ("usclip.commands.sweep", "run the paper's experiments from a manifest (or write SLURM scripts)"),
    "configs": ("usclip.commands.configs", "list the configs shipped in the package (usable as --config NAME)"),
    "app": ("usclip.commands.app", "a web page to try a trained model on one's own scans (research use only)"),
    "export": ("usclip.commands.export", "share a trained run: a folder loaded in one line, ONNX, Hugging Face Hub"),
}

HELP = f"""usage: usclip [-h] [--version] SUBCOMMAND ...

usclip {__version__}: adapt CLIP-style vision-language models to medical ultrasound.

subcommands:
  fit        train a task from YAML configs (usclip fit --config configs/busi_seg.yaml)
  validate   run the validation loop of a trained model
  test       test a checkpoint and write results/ (metrics, per-image table, overlays)
  predict    write masks or class probabilities for new images
{chr(10).join(f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items())}

options:
  -h, --help  show this message and exit; `usclip SUBCOMMAND --help` lists a subcommand's options
  --version   print the version and exit

Any YAML value can be overridden on the command line (--trainer.max_epochs=50). Docs: README.md, docs/.
"""


def _command_main(name: str) -> Callable[[list[str]], int]:
    module = __import__(COMMANDS[name][0], fromlist=["main"])
    return module.main


def _raised_in_parser(err: BaseException) -> bool:
    """Whether ``err`` was raised by the argument parser (jsonargparse, LightningCLI) rather than by usclip."""
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and ("jsonargparse" in last or "argparse" in last or "lightning/pytorch/cli" in last)


def _chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def configuration_error_message(err: BaseException) -> str:
    """One clear message for an error raised while a configuration is parsed or its classes are built.

    The first exception of the chain raised outside the parser is the cause a user can act on (e.g. usclip's
    "could not fetch the 'ViT-B-16' 'openai' weights ..."): its message is returned. A pure parser error (misspelt
    key, wrong type) keeps the parser's message without the dumps of whole namespaces.
    """
    chain = _chain(err)
    for e in chain:
        if not _raised_in_parser(e) and str(e).strip():
            return str(e).strip()
    lines = [ln for ln in str(chain[0]).strip().splitlines() if "Namespace(" not in ln and "Given value type" not in ln]
    key = re.search(r'Parser key "([^"]+)"', lines[0]) if lines else None
    actionable = re.compile(r"is not accepted|Expected a|Unexpected|No action")
    specific = next((ln.strip() for ln in lines if actionable.search(ln)), None)
    if key and specific:  # the actionable line first, then the parser's details
        lines = [f"{key.group(1)}: {specific.lstrip('- ')}", *lines[1:]]
    return "\n".join(lines[:20])


def main(args: list[str] | None = None, run: bool = True) -> UsclipCLI:
    """Run the ``usclip`` command line (``args=None`` reads ``sys.argv``; ``run=False`` only instantiates).

    Returns:
        The LightningCLI object for ``fit``/``validate``/``test``/``predict`` (and for ``run=False``).

    Raises:
        SystemExit: for ``--help``, ``--version``, the argparse subcommands (their exit code), and errors.
    """
    argv = sys.argv[1:] if args is None else list(args)
    first = argv[0] if argv else None
    if first in COMMANDS:
        raise SystemExit(_run_printing(lambda: _command_main(first)(argv[1:])))  # `usclip configs | head`
    if first in ("--version", "-V"):
        print(f"usclip {__version__}")
        raise SystemExit(0)
    if run and (first is None or first in ("-h", "--help")):
        print(HELP, end="")
        raise SystemExit(0 if first else 2)
    from usclip.packaged_configs import resolve_config

    if args is not None:
        args = _with_packaged_configs(list(args), resolve_config)
    elif (resolved := _with_packaged_configs(argv, resolve_config)) != argv:
        sys.argv[1:] = resolved  # LightningCLI reads sys.argv itself when args is None
    for path in _config_paths(list(args) if args is not None else sys.argv[1:]):
        problem = config_file_problem(path)
        if problem:
            print(f"usclip: error: {problem}", file=sys.stderr)
            raise SystemExit(2)
    from usclip.lightning_cli import run_lightning_cli  # Lightning, torch and the tasks: seconds

    if os.environ.get("USCLIP_DEBUG", "") not in ("", "0"):
        return run_lightning_cli(args, run=run)
    try:
        return run_lightning_cli(args, run=run)
    except SystemExit:
        raise
    except Exception as err:
        if not _is_configuration_error(err):
            raise
        print(f"usclip: error: {configuration_error_message(err)}", file=sys.stderr)
        print("(the full message: rerun with USCLIP_DEBUG=1)", file=sys.stderr)
        raise SystemExit(2) from err


def _run_printing(command: Callable[[], int | str | None]) -> int | str | None:
    """Run a command that prints to stdout; a reader that stops early (``usclip configs | head``) ends it quietly.

    When the reader of a pipe exits, the next write (or the final flush) raises ``BrokenPipeError``: the command
    stops there, stdout is pointed at ``os.devnull`` so that the interpreter's own flush at exit stays silent (no
    traceback, no "Exception ignored" message), and the exit code is 0: the reader has what it wanted, as with
    ``usclip sweep --dry-run | head``. Returns the command's exit code (``SystemExit`` codes, e.g. of
    ``--help``, included).
    """
    try:
        try:
            code = command()
        except SystemExit as exit_:  # argparse's --help and errors: flush what they printed first
            code = exit_.code
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    return code


def _with_packaged_configs(argv: list[str], resolve: Callable[[str], str]) -> list[str]:
    """``--config NAME`` / ``--config=NAME`` point to the packaged config when ``NAME`` is not a file here."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve(arg.removeprefix("--config="))
    return out


def _config_paths(argv: list[str]) -> list[str]:
    """The values of ``--config`` in ``argv`` (``--config PATH`` and ``--config=PATH``)."""
    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    return paths + [arg.removeprefix("--config=") for arg in argv if arg.startswith("--config=")]


def config_file_problem(path: str) -> str | None:
    """Why the file ``path`` given to ``--config`` is no YAML config (binary, not UTF-8, bad YAML), or ``None``.

    Checked before the parser reads it: the parser would fail with a ``UnicodeDecodeError`` traceback on an image,
    and name neither the file nor the line of a YAML syntax error. A path that is not a file is left to the parser
    (its message names it), and so are the keys of a valid YAML file.
    """
    file = Path(path)
    if not file.is_file():
        return None
    try:
        data = file.read_bytes()
    except OSError as err:
        return f"--config {path}: cannot be read ({err.strerror or err})"
    fix = "give a YAML config file (`usclip configs` lists the packaged ones, usable as --config NAME)"
    if b"\x00" in data[:8192] or data[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1"):
        return f"--config {path} is a binary file, not a YAML config; {fix}"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return f"--config {path} is not UTF-8 text (byte {err.start}: {data[err.start : err.start + 1]!r}); {fix}"
    import yaml

    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        return f"--config {path} is not valid YAML: {problem}{where}"
    if loaded is not None and not isinstance(loaded, dict):
        return (
            f"--config {path} holds a YAML {type(loaded).__name__}, not a mapping of keys (trainer:, model:, data:); "
            f"{fix}"
        )
    return None


def _is_configuration_error(err: BaseException) -> bool:
    """Errors raised while the configuration is parsed or its classes are built (not during training)."""
    return _raised_in_parser(err) or any(type(e).__name__ == "ArgumentError" for e in _chain(err))


def console_main() -> None:
    """Entry point of the ``usclip`` console script.

    Console scripts call ``sys.exit(entry())``: returning the CLI object from there would print it and exit with
    status 1 after a successful run, so this wrapper returns nothing.
    """
    main()


def __getattr__(name: str) -> Any:
    """``usclip.cli.UsclipCLI`` still works, imported on first use."""
    if name in ("UsclipCLI", "run_lightning_cli", "EPILOG"):
        from usclip import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    console_main()
