"""Parse dataset.json and discover cases in the unchanged nnU-Net v2 raw layout.

`scan_dataset` is lenient: it returns whatever it could parse plus every problem it saw, so
`autoseg check` can report them all at once. `load_dataset` is strict and raises on errors.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from autoseg.dataset.contract import Case, Dataset, LabelDef, Problem
from autoseg.errors import DatasetError
from autoseg.io import SUPPORTED_ENDINGS

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


def load_dataset(root: str | Path) -> Dataset:
    """Parse a raw dataset folder; raise DatasetError naming every structural problem."""
    dataset, problems = scan_dataset(root)
    errors = [p for p in problems if p.severity == "error"]
    if errors or dataset is None:
        lines = "\n".join(f"  {p}" for p in errors)
        raise DatasetError(
            f"the dataset has {len(errors)} problem(s):\n{lines}",
            path=root,
            hint=f"fix them, then run `autoseg check {root}`",
        )
    return dataset


def read_dataset_json(path: str | Path) -> Dataset:
    """The labels, channels and file ending of a dataset.json alone (no cases), e.g. a model folder's copy."""
    path = Path(path)
    raw, problems = _read_json(path) if path.is_file() else (None, [])
    if raw is None or _check_keys(raw, path):
        raise DatasetError("dataset.json is missing or unreadable", path=path,
                           hint="the model folder is incomplete: copy the dataset's dataset.json into it")
    labels, ignore = _parse_labels(raw["labels"], path, problems)
    order = raw.get("regions_class_order")
    return Dataset(
        name=path.parent.name, root=str(path.parent), channel_names=_parse_channels(raw, path, problems),
        labels=labels, file_ending=str(raw["file_ending"]), num_training=0, cases=(), ignore_label=ignore,
        regions_class_order=tuple(int(v) for v in order) if isinstance(order, list) else None,
    )


def scan_dataset(root: str | Path) -> tuple[Dataset | None, list[Problem]]:
    """Parse dataset.json and list the cases; never raises for dataset faults."""
    root = Path(root).resolve()
    json_path = root / "dataset.json"
    if not json_path.is_file():
        fix = "create dataset.json (see docs/dataset-format.md) or point autoseg at the dataset folder"
        return None, [Problem(str(json_path), "dataset.json is missing", fix)]
    raw, problems = _read_json(json_path)
    if raw is None:
        return None, problems
    spec_problems = _check_keys(raw, json_path)
    problems += spec_problems
    if any(p.severity == "error" for p in spec_problems):
        return None, problems
    channels = _parse_channels(raw, json_path, problems)
    labels, ignore = _parse_labels(raw["labels"], json_path, problems)
    ending = str(raw["file_ending"])
    if ending.lower() not in SUPPORTED_ENDINGS:
        problems.append(Problem(str(json_path), f"file_ending {ending!r} is not supported",
                                f"use one of {', '.join(SUPPORTED_ENDINGS)}"))
    if "dataset" in raw:
        cases = _cases_from_mapping(raw["dataset"], root, problems)
    else:
        cases = _discover_cases(root, ending, len(channels), problems)
    num_training = _int_or_none(raw["numTraining"])
    if num_training != len(cases):
        problems.append(Problem(str(json_path), f"numTraining is {raw['numTraining']!r} but {len(cases)} "
                                "cases were found", f"set \"numTraining\": {len(cases)}"))
    order = raw.get("regions_class_order")
    dataset = Dataset(
        name=root.name, root=str(root), channel_names=channels, labels=labels, file_ending=ending,
        num_training=len(cases), cases=tuple(cases), ignore_label=ignore,
        regions_class_order=tuple(int(v) for v in order) if isinstance(order, list) else None,
    )
    return dataset, problems


#: Duplicated keys named one by one; the rest are counted in one problem.
MAX_LISTED_DUPLICATES = 20


def _read_json(path: Path) -> tuple[dict[str, Any] | None, list[Problem]]:
    duplicates: list[str] = []

    def keep_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        counts = Counter(k for k, _ in pairs)  # linear: a million labels must not take hours
        duplicates.extend(sorted(k for k, n in counts.items() if n > 1))
        return dict(pairs)

    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=keep_pairs)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, [Problem(str(path), f"not valid JSON ({err})",
                              "fix the syntax (python -m json.tool FILE)")]
    except RecursionError:
        return None, [Problem(str(path), "nested too deeply to be a dataset.json",
                              "see docs/dataset-format.md for its few levels of nesting")]
    if not isinstance(data, dict):
        return None, [Problem(str(path), "top level is not a JSON object", "see docs/dataset-format.md")]
    problems = [Problem(str(path), f"key {k!r} appears more than once (only the last counts)",
                        "remove the duplicate entry") for k in duplicates[:MAX_LISTED_DUPLICATES]]
    if len(duplicates) > MAX_LISTED_DUPLICATES:
        problems.append(Problem(str(path), f"{len(duplicates) - MAX_LISTED_DUPLICATES} more keys appear more "
                                           "than once", "remove the duplicate entries"))
    return data, problems


def _check_keys(raw: dict[str, Any], path: Path) -> list[Problem]:
    problems = []
    if "channel_names" not in raw and "modality" in raw:
        raw["channel_names"] = raw["modality"]
        problems.append(Problem(str(path), "uses the nnU-Net v1 key 'modality'",
                                "rename it to 'channel_names'", "warning"))
    for key in REQUIRED_KEYS:
        if key not in raw:
            problems.append(Problem(str(path), f"required key {key!r} is missing",
                                    f"add \"{key}\" (see docs/dataset-format.md)"))
    if "labels" in raw and not isinstance(raw["labels"], dict):
        problems.append(Problem(str(path), "'labels' is not an object",
                                "write it as {\"background\": 0, ...}"))
    if "channel_names" in raw and not isinstance(raw["channel_names"], dict):
        problems.append(Problem(str(path), "'channel_names' is not an object", "write it as {\"0\": \"CT\"}"))
    return problems


def _parse_channels(raw: dict[str, Any], path: Path, problems: list[Problem]) -> tuple[str, ...]:
    entries = raw["channel_names"]
    indices = sorted(entries, key=lambda k: int(k) if _is_number(str(k)) else 10**6)
    if [str(i) for i in range(len(indices))] != [str(k) for k in indices]:
        problems.append(Problem(str(path), f"channel_names keys {indices} are not 0, 1, 2, ...",
                                "number the channels from \"0\" without gaps"))
    return tuple(str(entries[k]) for k in indices)


def _parse_labels(entries: dict[str, Any], path: Path, problems: list[Problem]
                  ) -> tuple[tuple[LabelDef, ...], int | None]:
    if entries and all(_is_number(str(k).lstrip("-")) and isinstance(v, str) for k, v in entries.items()):
        problems.append(Problem(str(path), "labels map values to names (nnU-Net v1 / MSD style)",
                                "invert it to name -> value, e.g. {\"background\": 0, \"liver\": 1}; "
                                "autoseg reads it inverted for now", "warning"))
        entries = {v: int(k) for k, v in entries.items()}
    labels, ignore = [], None
    for name, value in entries.items():
        values = _label_values(value)
        if values is None:
            problems.append(Problem(str(path), f"label {name!r} has value {value!r}",
                                    "use a whole number, or a list of whole numbers for a region"))
        elif name == "ignore":
            ignore = values[0] if len(values) == 1 else None
            if ignore is None:
                problems.append(Problem(str(path), "the ignore label is a list", "give it one integer value"))
        else:
            labels.append(LabelDef(str(name), values))
    _check_label_values(labels, ignore, path, problems)
    return tuple(labels), ignore


def _label_values(value: Any) -> tuple[int, ...] | None:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return None
    return tuple(items)


def _check_label_values(labels: list[LabelDef], ignore: int | None, path: Path,
                        problems: list[Problem]) -> None:
    plain = sorted(label.values[0] for label in labels if not label.is_region)
    if 0 not in plain:
        problems.append(Problem(str(path), "labels have no background (value 0)", "add \"background\": 0"))
    if plain != list(range(len(plain))):
        problems.append(Problem(str(path), f"label values {plain} are not consecutive from 0",
                                "renumber the labels 0, 1, 2, ... in the label files and dataset.json"))
    if ignore is not None and plain and ignore != max(plain) + 1:
        problems.append(Problem(str(path), f"ignore label {ignore} is not the highest value",
                                f"set \"ignore\": {max(plain) + 1} (one above the highest label)"))


def _discover_cases(root: Path, ending: str, n_channels: int, problems: list[Problem]) -> list[Case]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            problems.append(Problem(str(folder), "folder is missing",
                                    f"create {folder.name}/ with the case files"))
    if not images_dir.is_dir():
        return []
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(ending)}$")
    channels: dict[str, dict[int, str]] = defaultdict(dict)
    for file in sorted(images_dir.iterdir()):
        match = pattern.match(file.name)
        if file.name.startswith("."):
            continue
        if not match:
            problems.append(Problem(str(file), f"name does not follow CASE_XXXX{ending}",
                                    f"rename it to <case>_0000{ending} (4-digit channel index)"))
            continue
        channels[match["case"]][int(match["channel"])] = str(file)
    _report_case_collisions(channels, images_dir, problems)
    cases = [_make_case(case_id, found, n_channels, labels_dir, ending, problems)
             for case_id, found in sorted(channels.items())]
    _report_orphan_labels(labels_dir, set(channels), ending, problems)
    return cases


def _make_case(case_id: str, found: dict[int, str], n_channels: int, labels_dir: Path, ending: str,
               problems: list[Problem]) -> Case:
    for index in range(n_channels):
        if index not in found:
            missing = labels_dir.parent / "imagesTr" / f"{case_id}_{index:04d}{ending}"
            problems.append(Problem(str(missing), f"case {case_id!r} is missing channel {index}",
                                    "add the file, or remove the case's other files"))
    for index in sorted(found):
        if index >= n_channels:
            problems.append(Problem(found[index], f"channel {index} is not declared in channel_names",
                                    "declare it in channel_names, or remove the file"))
    label = labels_dir / f"{case_id}{ending}"
    if not label.is_file():
        problems.append(Problem(str(label), f"case {case_id!r} has no label file",
                                "add the label, or move the case's images to imagesTs/"))
    images = tuple(found[i] for i in sorted(found) if i < n_channels)
    return Case(case_id, images, str(label) if label.is_file() else None)


def _report_case_collisions(channels: dict[str, dict[int, str]], folder: Path,
                            problems: list[Problem]) -> None:
    by_lower: dict[str, list[str]] = defaultdict(list)
    for case_id in channels:
        by_lower[case_id.lower()].append(case_id)
    for ids in by_lower.values():
        if len(ids) > 1:
            problems.append(Problem(str(folder), f"duplicate case ids differing only in case: {sorted(ids)}",
                                    "rename one case; they collide on case-insensitive file systems"))


def _report_orphan_labels(labels_dir: Path, case_ids: set[str], ending: str, problems: list[Problem]) -> None:
    if not labels_dir.is_dir():
        return
    for file in sorted(labels_dir.iterdir()):
        if file.name.startswith("."):
            continue
        if not file.name.endswith(ending):
            problems.append(Problem(str(file), f"label file does not end with {ending}",
                                    f"convert it to {ending} or remove it"))
        elif file.name[: -len(ending)] not in case_ids:
            case_id = file.name[: -len(ending)]
            problems.append(Problem(str(file), "label file has no image",
                                    f"add imagesTr/{case_id}_0000{ending}, or remove the label"))


def _is_number(text: str) -> bool:
    """ASCII decimal digits only: '²' and '٣' pass str.isdigit() but are no channel or label number."""
    return text.isascii() and text.isdecimal()


def _cases_from_mapping(mapping: Any, root: Path, problems: list[Problem]) -> list[Case]:
    where = str(root / "dataset.json")
    if not isinstance(mapping, dict):
        problems.append(Problem(where, f"'dataset' is a {type(mapping).__name__}, not an object",
                                'write it as {"CASE": {"images": ["imagesTr/CASE_0000.nii.gz"], "label": '
                                '"labelsTr/CASE.nii.gz"}, ...}'))
        return []
    cases = []
    for case_id, entry in sorted(mapping.items()):
        images, label = (entry.get("images"), entry.get("label")) if isinstance(entry, dict) else (None, None)
        if not (isinstance(images, list) and all(isinstance(i, str) for i in images)) or \
                not (label is None or isinstance(label, str)):
            problems.append(Problem(where, f"'dataset' entry {case_id!r} is not "
                                           '{"images": [file, ...], "label": file}',
                                    "fix the entry (paths relative to the dataset folder)"))
            continue
        images = tuple(str((root / p).resolve()) for p in images)
        label_path = str((root / label).resolve()) if label else None
        for file in (*images, *(label_path and [label_path] or [])):
            if not Path(file).is_file():
                problems.append(Problem(file, f"file of case {case_id!r} listed in 'dataset' does not exist",
                                        "fix the path in dataset.json"))
        cases.append(Case(str(case_id), images, label_path))
    return cases


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
