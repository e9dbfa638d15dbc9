"""The paper's experiments as data: a manifest YAML expanded into runs (one per table cell and seed).

A manifest (``usclip/reproduce/paper.yaml`` is the paper's; ``docs/reproduce.md`` describes the format) lists
*prerequisites* (runs that are not table cells, e.g. the caption fine-tuning behind the "ft." rows) and *tables*:
each table group (Table 2 segmentation, Table 3 supervised / zero-shot) crosses its methods with its datasets.
A cell composes the dataset's configs with the method's overlays (``--config`` after ``--config``) and adds
``args`` (option -> value). Values may name a dataset as ``${NAME}``: the folder comes from the user's
``datasets.yaml`` (name -> folder), never from editing configs.

*Protocols* (optional, top-level ``protocols`` and ``default_protocol``) run the same cells under different
choices: the paper manifest's ``authors`` protocol is what produced the published numbers, ``usclip`` usclip's
defaults. A protocol may add overlays (``configs``, ``args``) to every cell of a row group
(``protocols.<name>.groups.<group>``), and a method or prerequisite may replace its ``configs``, ``args``,
``dataset_args``, ``adapter_from``, ``seeds`` or ``note`` under one protocol (``protocols.<name>`` inside the
method). A cell's configs are, in this order (later ``--config`` files override earlier ones): the dataset's, the
protocol's group overlays, the method's; then the args (dataset, group overlay, method, the method's per-dataset
args). ::

    protocols:
      authors: {description: ..., groups: {segmentation: {configs: [configs/metrics/authors.yaml]}}}
      usclip: {description: ...}
    default_protocol: authors
    tables:
      - table: table2
        methods:
          CLIP (Mona):
            configs: [configs/adapters/mona.yaml]
            protocols: {authors: {configs: [configs/adapters/mona_released.yaml]}}

A table group with ``deterministic: true`` (zero-shot: nothing trains) runs each cell once, at the first of the
sweep's seeds; a method of it that starts from a prerequisite (``adapter_from``) still runs at every seed, since
its input differs per seed. A method's ``seeds`` replace the manifest's (``--seeds`` replaces both).

A run lives in ``<runs_root>/[<protocol>/]<table>/<dataset>/<method slug>/seed_<seed>`` (prerequisites in
``<runs_root>/[<protocol>/]<prerequisite dir>/<slug>/seed_<seed>``; the protocol folder only for manifests that
declare protocols); Lightning writes there through the TensorBoardLogger's ``save_dir``/``name``/``version``. A
cell that trains runs ``usclip fit`` then ``usclip test`` on its best checkpoint; an external test set
(``external_test_of``: LN-2 of an LN-1 model) runs ``usclip test`` on the checkpoint of the same method, seed and
protocol on the training dataset; a test-only group (zero-shot) runs ``usclip test``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "PAPER_MANIFEST",
    "ManifestError",
    "Run",
    "default_protocol",
    "expand_runs",
    "load_datasets",
    "load_manifest",
    "order_runs",
    "protocol_names",
    "select_runs",
    "slugify",
]

PAPER_MANIFEST = Path(__file__).with_name("paper.yaml")
PLACEHOLDER = re.compile(r"\$\{([^}]+)\}")
SUBCOMMANDS = ("fit", "test")
TOP_LEVEL_KEYS = ("seeds", "args", "prerequisites", "tables", "protocols", "default_protocol")
# what a method (or prerequisite) may replace under one protocol
METHOD_OVERRIDES = ("configs", "args", "dataset_args", "adapter_from", "seeds", "note")
PREREQUISITE_OVERRIDES = ("configs", "args", "note")


class ManifestError(ValueError):
    """A manifest, a datasets file or a selection is not usable (the message names the file and the entry)."""


@dataclass
class Run:
    """One experiment: a table cell at one seed, or a prerequisite run at one seed.

    Attributes:
        key: the run directory relative to the runs root (``authors/table2/LN-1/clip_mona/seed_1``, without the
            protocol folder for manifests without protocols); unique.
        table: ``table2``/``table3``, or ``None`` for a prerequisite.
        group: the paper's row group (``segmentation``, ``supervised``, ``zero-shot``) or ``None``.
        method: the paper's method name (``CLIP (Mona, ft.)``) or the prerequisite's description.
        dataset: the paper's dataset name (``LN-2``) or the prerequisite's data (``PMC-OA + CURD``).
        seed: the training seed (``--seed_everything``).
        slug: the logger name (filesystem-safe method slug).
        save_dir: the logger's ``save_dir`` relative to the runs root (the run directory is save_dir/slug/seed_k).
        configs: the config files, in ``--config`` order (paths as written in the manifest).
        args: option -> value, after the configs (values may hold ``${NAME}`` placeholders).
        subcommands: ``fit``, ``test`` or both, in order.
        depends: keys of the runs that must finish first.
        ckpt_from: key of the run whose ``checkpoints/best.ckpt`` is tested (external test sets).
        adapter_from: key of the run whose ``adapters/best.safetensors`` starts this one (``ft.`` rows).
        reference: a reference row of the paper (UNet, ResNet18): reported, not ranked.
        note: the manifest's reason for the row's configs, if any.
        protocol: the manifest protocol it runs under (``authors``, ``usclip``), ``None`` without protocols.
        deterministic: the cell runs once (a ``deterministic`` group, no ``adapter_from``): seeds would not differ.
    """

    key: str
    table: str | None
    group: str | None
    method: str
    dataset: str
    seed: int
    slug: str
    save_dir: str
    configs: list[str]
    args: dict[str, str]
    subcommands: list[str]
    depends: list[str] = field(default_factory=list)
    ckpt_from: str | None = None
    adapter_from: str | None = None
    reference: bool = False
    note: str = ""
    protocol: str | None = None
    deterministic: bool = False

    @property
    def needs(self) -> list[str]:
        """Dataset names the run's arguments refer to (``${NAME}``), in order of appearance."""
        names: list[str] = []
        for value in self.args.values():
            names += [n for n in PLACEHOLDER.findall(value) if n not in names]
        return names


def slugify(name: str) -> str:
    """A filesystem-safe slug of a method name: ``CLIP (Mona, ft.)`` -> ``clip_mona_ft``."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if not slug:
        raise ManifestError(f"method name {name!r} has no letters or digits to make a folder name from")
    return slug


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{where}: expected a list of strings, got {value!r}")
    return list(value)


def _args(value: Any, where: str) -> dict[str, str]:
    out = {}
    for option, arg in _mapping(value, where).items():
        if not str(option).startswith("--"):
            raise ManifestError(f"{where}: option {option!r} must start with '--' (e.g. --data.init_args.root)")
        if isinstance(arg, (dict, list)):
            raise ManifestError(f"{where}: {option} must be a string, a number or null, got {arg!r} (quote JSON)")
        out[str(option)] = "null" if arg is None else str(arg).lower() if isinstance(arg, bool) else str(arg)
    return out


def _seed_list(value: Any, where: str) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        raise ManifestError(f"{where}: seeds must be a non-empty list of integers, got {value!r}")
    return list(value)


def _check_protocols(data: dict[str, Any], where: str) -> None:
    protocols = _mapping(data.get("protocols"), f"{where}: protocols")
    default = data.get("default_protocol")
    if not protocols:
        if default is not None:
            raise ManifestError(f"{where}: default_protocol={default!r} but the manifest declares no protocols")
        return
    if default is not None and default not in protocols:
        raise ManifestError(f"{where}: default_protocol={default!r} is not one of the protocols {sorted(protocols)}")
    groups = {str(g.get("group")) for g in data.get("tables", []) if isinstance(g, dict)}
    for name, spec in protocols.items():
        at = f"{where}: protocols.{name}"
        if name in ("all", "both"):
            raise ManifestError(f"{at}: {name!r} is reserved (--protocol {name} selects every protocol)")
        spec = _mapping(spec, at)
        unknown = set(spec) - {"description", "groups"}
        if unknown:
            raise ManifestError(f"{at}: unknown keys {sorted(unknown)} (description, groups)")
        for group, overlay in _mapping(spec.get("groups"), f"{at}.groups").items():
            if group not in groups:
                raise ManifestError(f"{at}.groups: {group!r} is not a row group of the tables ({sorted(groups)})")
            unknown = set(_mapping(overlay, f"{at}.groups.{group}")) - {"configs", "args"}
            if unknown:
                raise ManifestError(f"{at}.groups.{group}: unknown keys {sorted(unknown)} (configs, args)")


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read a manifest YAML (``paper`` for the packaged one) and check its structure.

    Raises:
        FileNotFoundError: the file does not exist.
        ManifestError: the YAML is not a manifest (the message names the entry).
    """
    path = PAPER_MANIFEST if str(path) == "paper" else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist (give a YAML path, or 'paper')")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    where = str(path)
    data = _mapping(data, where)
    unknown = set(data) - set(TOP_LEVEL_KEYS)
    if unknown:
        raise ManifestError(f"{where}: unknown top-level keys {sorted(unknown)} ({', '.join(TOP_LEVEL_KEYS)})")
    _seed_list(data.get("seeds", [1, 2, 3]), where)
    if not isinstance(data.get("tables", []), list):
        raise ManifestError(f"{where}: tables must be a list of table groups")
    _check_protocols(data, where)
    data["path"] = str(path)
    return data


def protocol_names(manifest: dict[str, Any]) -> list[str]:
    """The protocols a manifest declares, in its order (empty for a manifest without protocols)."""
    return list(_mapping(manifest.get("protocols"), "protocols"))


def default_protocol(manifest: dict[str, Any]) -> str | None:
    """The protocol a sweep runs when none is asked for: ``default_protocol``, else the only one, else ``None``."""
    names = protocol_names(manifest)
    default = manifest.get("default_protocol")
    return str(default) if default is not None else names[0] if len(names) == 1 else None


def _subcommands(value: Any, where: str) -> list[str]:
    subs = _str_list(value, where) or ["fit", "test"]
    bad = [s for s in subs if s not in SUBCOMMANDS]
    if bad or len(set(subs)) != len(subs):
        raise ManifestError(f"{where}: subcommands must be distinct values of {SUBCOMMANDS}, got {subs}")
    return subs


def _under(spec: dict[str, Any], protocol: str | None, allowed: tuple[str, ...], known: list[str], at: str) -> dict:
    """``spec`` with the keys its ``protocols.<protocol>`` replaces (every protocol named there is checked)."""
    overrides = _mapping(spec.get("protocols"), f"{at}.protocols")
    for name, override in overrides.items():
        if name not in known:
            raise ManifestError(f"{at}.protocols: {name!r} is not a protocol of the manifest ({known})")
        unknown = set(_mapping(override, f"{at}.protocols.{name}")) - set(allowed)
        if unknown:
            raise ManifestError(f"{at}.protocols.{name}: unknown keys {sorted(unknown)} (it may replace {allowed})")
    return {**spec, **_mapping(overrides.get(protocol), at)} if protocol is not None else dict(spec)


def _check_protocol(manifest: dict[str, Any], protocol: str | None) -> str | None:
    names, where = protocol_names(manifest), manifest["path"]
    if protocol is None:
        protocol = default_protocol(manifest)
        if names and protocol is None:
            raise ManifestError(f"{where}: no default_protocol; choose one of {names} (--protocol)")
    elif not names:
        raise ManifestError(f"{where} declares no protocols; drop --protocol {protocol}")
    elif protocol not in names:
        raise ManifestError(f"protocol {protocol!r} is not one of {where}'s protocols {names}")
    return protocol


def expand_runs(manifest: dict[str, Any], seeds: list[int] | None = None, protocol: str | None = None) -> list[Run]:
    """Every run of ``manifest`` (from :func:`load_manifest`) under one protocol at every seed, in the manifest's order.

    Args:
        manifest: the loaded manifest.
        seeds: override the manifest's (and the methods' own) seeds.
        protocol: one of the manifest's protocols (``None``: its default); must be ``None`` for a manifest
            without protocols.

    Raises:
        ManifestError: unknown keys, an unknown protocol, a dependency on something that does not exist, or two
            runs in one folder.
    """
    where = manifest["path"]
    protocol = _check_protocol(manifest, protocol)
    known = protocol_names(manifest)
    root = f"{protocol}/" if protocol is not None else ""
    base_seeds = seeds or manifest.get("seeds", [1, 2, 3])
    common = _args(manifest.get("args"), f"{where}: args")
    declared = _mapping(manifest.get("protocols"), "protocols")
    overlays = _mapping(declared.get(protocol) if protocol is not None else None, "protocol")
    group_overlays = _mapping(overlays.get("groups"), f"{where}: protocols.{protocol}.groups")
    runs: list[Run] = []
    prereqs = _mapping(manifest.get("prerequisites"), f"{where}: prerequisites")
    prereq_dir: dict[str, str] = {}
    for name, spec in prereqs.items():
        at = f"{where}: prerequisites.{name}"
        spec = _under(_mapping(spec, at), protocol, PREREQUISITE_OVERRIDES, known, at)
        slug = str(spec.get("slug") or slugify(name))
        save_dir = root + str(spec.get("dir", "prerequisites"))
        prereq_dir[name] = f"{save_dir}/{slug}"
        for seed in base_seeds:
            runs.append(
                Run(
                    key=f"{save_dir}/{slug}/seed_{seed}",
                    table=None,
                    group=None,
                    method=str(spec.get("method", name)),
                    dataset=str(spec.get("dataset", "")),
                    seed=seed,
                    slug=slug,
                    save_dir=save_dir,
                    configs=_str_list(spec.get("configs"), f"{at}.configs"),
                    args={**common, **_args(spec.get("args"), f"{at}.args")},
                    subcommands=_subcommands(spec.get("subcommands", ["fit"]), f"{at}.subcommands"),
                    note=str(spec.get("note", "")),
                    protocol=protocol,
                )
            )

    for t, group in enumerate(manifest.get("tables", [])):
        at = f"{where}: tables[{t}]"
        group = _mapping(group, at)
        table, row_group = group.get("table"), group.get("group")
        if table not in ("table2", "table3") or not isinstance(row_group, str):
            raise ManifestError(f"{at}: needs table (table2 or table3) and group, got {table!r} and {row_group!r}")
        subs = _subcommands(group.get("subcommands"), f"{at}.subcommands")
        prefix = str(group.get("slug_prefix", ""))
        deterministic = group.get("deterministic", False)
        if not isinstance(deterministic, bool):
            raise ManifestError(f"{at}: deterministic must be true or false, got {deterministic!r}")
        overlay = _mapping(group_overlays.get(row_group), f"{where}: protocols.{protocol}.groups.{row_group}")
        overlay_configs = _str_list(overlay.get("configs"), f"{where}: protocols.{protocol}.groups.{row_group}")
        overlay_args = _args(overlay.get("args"), f"{where}: protocols.{protocol}.groups.{row_group}.args")
        datasets = _mapping(group.get("datasets"), f"{at}.datasets")
        methods = _mapping(group.get("methods"), f"{at}.methods")
        for method, mspec in methods.items():
            mat = f"{at}.methods[{method!r}]"
            mspec = _under(_mapping(mspec, mat), protocol, METHOD_OVERRIDES, known, mat)
            slug = prefix + str(mspec.get("slug") or slugify(method))
            adapter = mspec.get("adapter_from")
            if adapter is not None and adapter not in prereqs:
                raise ManifestError(f"{mat}: adapter_from={adapter!r} is not a prerequisite ({sorted(prereqs)})")
            method_seeds = seeds or _seed_list(mspec.get("seeds", base_seeds), f"{mat}.seeds")
            if deterministic and adapter is None:
                method_seeds = method_seeds[:1]  # the same result at every seed: run once
            dataset_args = _mapping(mspec.get("dataset_args") or {}, f"{mat}.dataset_args")
            for dataset, dspec in datasets.items():
                dat = f"{at}.datasets[{dataset!r}]"
                dspec = _mapping(dspec, dat)
                external = dspec.get("external_test_of")
                if external is not None and external not in datasets:
                    raise ManifestError(f"{dat}: external_test_of={external!r} is not a dataset of this group")
                for seed in method_seeds:
                    run = Run(
                        key=f"{root}{table}/{dataset}/{slug}/seed_{seed}",
                        table=table,
                        group=row_group,
                        method=str(method),
                        dataset=str(dataset),
                        seed=seed,
                        slug=slug,
                        save_dir=f"{root}{table}/{dataset}",
                        configs=_str_list(dspec.get("configs"), f"{dat}.configs")
                        + overlay_configs
                        + _str_list(mspec.get("configs"), f"{mat}.configs"),
                        args={
                            **common,
                            **_args(dspec.get("args"), f"{dat}.args"),
                            **overlay_args,
                            **_args(mspec.get("args"), f"{mat}.args"),
                            **_args(dataset_args.get(dataset), f"{mat}.dataset_args[{dataset!r}]"),
                        },
                        subcommands=["test"] if external is not None else subs,
                        reference=bool(mspec.get("reference", False)),
                        note=str(mspec.get("note", "")),
                        protocol=protocol,
                        deterministic=deterministic and adapter is None,
                    )
                    if adapter is not None:
                        run.adapter_from = f"{prereq_dir[adapter]}/seed_{seed}"
                        run.depends.append(run.adapter_from)
                    if external is not None:
                        run.ckpt_from = f"{root}{table}/{external}/{slug}/seed_{seed}"
                        run.depends.append(run.ckpt_from)
                    runs.append(run)
    keys = [r.key for r in runs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ManifestError(f"{where}: several runs share a folder {dupes[:3]}; give the methods distinct slugs")
    known_keys = set(keys)
    for run in runs:
        for dep in run.depends:
            if dep not in known_keys:
                raise ManifestError(f"{where}: run {run.key} depends on {dep}, which the manifest does not define")
    return runs


def order_runs(runs: list[Run]) -> list[Run]:
    """Dependency order, otherwise the manifest's order (a stable topological sort).

    Raises:
        ManifestError: on a dependency cycle.
    """
    by_key = {r.key: r for r in runs}
    done: set[str] = set()
    out: list[Run] = []
    pending = list(runs)
    while pending:
        ready = [r for r in pending if all(d in done or d not in by_key for d in r.depends)]
        if not ready:
            raise ManifestError(f"dependency cycle among {[r.key for r in pending][:5]}")
        first = ready[0]
        out.append(first)
        done.add(first.key)
        pending.remove(first)
    return out


def select_runs(runs: list[Run], only: list[str] | None) -> tuple[list[Run], list[Run]]:
    """Runs matching ``only`` and the runs they depend on (transitively), each list in dependency order.

    ``only`` values name a table (``table2``), a row group (``zero-shot``), a dataset (``LN-2``), a method
    (``CLIP (Mona, ft.)`` or its slug ``clip_mona_ft``) or a run key. Values of the same kind are alternatives;
    different kinds must all match (``--only table2 --only BUSI --only DDTI``: Table 2 on BUSI or DDTI).

    Returns:
        ``(selected, dependencies)``: the matching runs, and the runs outside the selection they need.

    Raises:
        ManifestError: a value that matches nothing (the message lists the valid values).
    """
    if not only:
        return order_runs(runs), []
    fields = {
        "table": lambda r: {r.table},
        "group": lambda r: {r.group},
        "dataset": lambda r: {r.dataset},
        "method": lambda r: {r.method, r.slug} if r.table else {r.method},  # prerequisites: by description
        "run": lambda r: {r.key},
    }
    wanted: dict[str, set[str]] = {}
    for value in only:
        kinds = [k for k, get in fields.items() if any(value in get(r) for r in runs)]
        if not kinds:
            kinds_shown = ("table", "group", "dataset", "method")
            valid = sorted({v for r in runs for k in kinds_shown for v in fields[k](r) if v})
            raise ManifestError(f"--only {value!r} matches no table, group, dataset, method or run; valid: {valid}")
        wanted.setdefault(kinds[0], set()).add(value)
    chosen = [r for r in runs if all(get_values & fields[k](r) for k, get_values in wanted.items())]
    by_key = {r.key: r for r in runs}
    keys = {r.key for r in chosen}
    deps: set[str] = set()
    stack = [d for r in chosen for d in r.depends]
    while stack:
        dep = stack.pop()
        if dep not in keys and dep not in deps:
            deps.add(dep)
            stack += by_key[dep].depends
    ordered = order_runs([r for r in runs if r.key in keys or r.key in deps])
    return [r for r in ordered if r.key in keys], [r for r in ordered if r.key in deps]


def load_datasets(path: str | Path) -> dict[str, str]:
    """The user's ``datasets.yaml``: dataset (or weights file) name -> folder; relative paths are taken from the file.

    Raises:
        FileNotFoundError: the file does not exist.
        ManifestError: not a mapping of names to paths.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--datasets {str(path)!r} does not exist (a YAML file: name -> folder, see docs)")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not all(isinstance(v, str) and v for v in data.values()):
        raise ManifestError(f"{path}: expected 'NAME: /path/to/folder' lines (e.g. BUSI: /data/BUSI), got {data!r}")
    return {str(k): str((path.parent / Path(v).expanduser()).resolve()) for k, v in data.items()}
