"""The paper's experiments as data: a manifest YAML expanded into runs (one per table cell and seed).

A manifest (``usclip/reproduce/paper.yaml`` is the paper's; ``docs/reproduce.md`` describes the format) lists
*prerequisites* (runs that are not table cells, e.g. the caption fine-tuning behind the "ft." rows) and *tables*:
each table group (Table 2 segmentation, Table 3 supervised / zero-shot) crosses its methods with its datasets.
A cell composes the dataset's configs with the method's overlays (``--config`` after ``--config``) and adds
``args`` (option -> value). Values may name a dataset as ``${NAME}``: the folder comes from the user's
``datasets.yaml`` (name -> folder), never from editing configs.

A run lives in ``<runs_root>/<table>/<dataset>/<method slug>/seed_<seed>`` (prerequisites in
``<runs_root>/<prerequisite dir>/seed_<seed>``); Lightning writes there through the TensorBoardLogger's
``save_dir``/``name``/``version``. A cell that trains runs ``usclip fit`` then ``usclip test`` on its best
checkpoint; an external test set (``external_test_of``: LN-2 of an LN-1 model) runs ``usclip test`` on the
checkpoint of the same method and seed on the training dataset; a test-only group (zero-shot) runs ``usclip test``.
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
    "expand_runs",
    "load_datasets",
    "load_manifest",
    "order_runs",
    "select_runs",
    "slugify",
]

PAPER_MANIFEST = Path(__file__).with_name("paper.yaml")
PLACEHOLDER = re.compile(r"\$\{([^}]+)\}")
SUBCOMMANDS = ("fit", "test")


class ManifestError(ValueError):
    """A manifest, a datasets file or a selection is not usable (the message names the file and the entry)."""


@dataclass
class Run:
    """One experiment: a table cell at one seed, or a prerequisite run at one seed.

    Attributes:
        key: the run directory relative to the runs root (``table2/LN-1/clip_mona/seed_1``); unique.
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
    unknown = set(data) - {"seeds", "args", "prerequisites", "tables"}
    if unknown:
        raise ManifestError(f"{where}: unknown top-level keys {sorted(unknown)} (seeds, args, prerequisites, tables)")
    seeds = data.get("seeds", [1, 2, 3])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ManifestError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    if not isinstance(data.get("tables", []), list):
        raise ManifestError(f"{where}: tables must be a list of table groups")
    data["path"] = str(path)
    return data


def _subcommands(value: Any, where: str) -> list[str]:
    subs = _str_list(value, where) or ["fit", "test"]
    bad = [s for s in subs if s not in SUBCOMMANDS]
    if bad or len(set(subs)) != len(subs):
        raise ManifestError(f"{where}: subcommands must be distinct values of {SUBCOMMANDS}, got {subs}")
    return subs


def expand_runs(manifest: dict[str, Any], seeds: list[int] | None = None) -> list[Run]:
    """Every run of ``manifest`` (from :func:`load_manifest`) at every seed, in the manifest's order.

    Args:
        manifest: the loaded manifest.
        seeds: override the manifest's seeds.

    Raises:
        ManifestError: unknown keys, a dependency on something that does not exist, or two runs in one folder.
    """
    where = manifest["path"]
    seeds = seeds or manifest.get("seeds", [1, 2, 3])
    common = _args(manifest.get("args"), f"{where}: args")
    runs: list[Run] = []
    prereqs = _mapping(manifest.get("prerequisites"), f"{where}: prerequisites")
    for name, spec in prereqs.items():
        at = f"{where}: prerequisites.{name}"
        spec = _mapping(spec, at)
        slug = str(spec.get("slug") or slugify(name))
        for seed in seeds:
            runs.append(
                Run(
                    key=f"{spec.get('dir', 'prerequisites')}/{slug}/seed_{seed}",
                    table=None,
                    group=None,
                    method=str(spec.get("method", name)),
                    dataset=str(spec.get("dataset", "")),
                    seed=seed,
                    slug=slug,
                    save_dir=str(spec.get("dir", "prerequisites")),
                    configs=_str_list(spec.get("configs"), f"{at}.configs"),
                    args={**common, **_args(spec.get("args"), f"{at}.args")},
                    subcommands=_subcommands(spec.get("subcommands", ["fit"]), f"{at}.subcommands"),
                    note=str(spec.get("note", "")),
                )
            )
    prereq_key = {name: str(_mapping(s, name).get("slug") or slugify(name)) for name, s in prereqs.items()}
    prereq_dir = {name: str(_mapping(s, name).get("dir", "prerequisites")) for name, s in prereqs.items()}

    for t, group in enumerate(manifest.get("tables", [])):
        at = f"{where}: tables[{t}]"
        group = _mapping(group, at)
        table, row_group = group.get("table"), group.get("group")
        if table not in ("table2", "table3") or not isinstance(row_group, str):
            raise ManifestError(f"{at}: needs table (table2 or table3) and group, got {table!r} and {row_group!r}")
        subs = _subcommands(group.get("subcommands"), f"{at}.subcommands")
        prefix = str(group.get("slug_prefix", ""))
        datasets = _mapping(group.get("datasets"), f"{at}.datasets")
        methods = _mapping(group.get("methods"), f"{at}.methods")
        for method, mspec in methods.items():
            mat = f"{at}.methods[{method!r}]"
            mspec = _mapping(mspec, mat)
            slug = prefix + str(mspec.get("slug") or slugify(method))
            adapter = mspec.get("adapter_from")
            if adapter is not None and adapter not in prereqs:
                raise ManifestError(f"{mat}: adapter_from={adapter!r} is not a prerequisite ({sorted(prereqs)})")
            for dataset, dspec in datasets.items():
                dat = f"{at}.datasets[{dataset!r}]"
                dspec = _mapping(dspec, dat)
                external = dspec.get("external_test_of")
                if external is not None and external not in datasets:
                    raise ManifestError(f"{dat}: external_test_of={external!r} is not a dataset of this group")
                for seed in seeds:
                    run = Run(
                        key=f"{table}/{dataset}/{slug}/seed_{seed}",
                        table=table,
                        group=row_group,
                        method=str(method),
                        dataset=str(dataset),
                        seed=seed,
                        slug=slug,
                        save_dir=f"{table}/{dataset}",
                        configs=_str_list(dspec.get("configs"), f"{dat}.configs")
                        + _str_list(mspec.get("configs"), f"{mat}.configs"),
                        args={
                            **common,
                            **_args(dspec.get("args"), f"{dat}.args"),
                            **_args(mspec.get("args"), f"{mat}.args"),
                            **_args(
                                _mapping(mspec.get("dataset_args") or {}, f"{mat}.dataset_args").get(dataset),
                                f"{mat}.dataset_args[{dataset!r}]",
                            ),
                        },
                        subcommands=["test"] if external is not None else subs,
                        reference=bool(mspec.get("reference", False)),
                        note=str(mspec.get("note", "")),
                    )
                    if adapter is not None:
                        run.adapter_from = f"{prereq_dir[adapter]}/{prereq_key[adapter]}/seed_{seed}"
                        run.depends.append(run.adapter_from)
                    if external is not None:
                        run.ckpt_from = f"{table}/{external}/{slug}/seed_{seed}"
                        run.depends.append(run.ckpt_from)
                    runs.append(run)
    keys = [r.key for r in runs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ManifestError(f"{where}: several runs share a folder {dupes[:3]}; give the methods distinct slugs")
    known = set(keys)
    for run in runs:
        for dep in run.depends:
            if dep not in known:
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
