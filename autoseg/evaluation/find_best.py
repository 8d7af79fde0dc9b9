"""Choose the best setup on cross-validation: a configuration or a pair ensemble, then postprocessing.

As nnU-Net's find_best_configuration: the out-of-fold validation predictions of each trained model folder
(every configuration of every plans identifier, i.e. network family) are merged into one cross-validation
folder and evaluated; every pair is ensembled from their probabilities and evaluated the same way; the
highest foreground mean Dice wins (ties: the first, singles before ensembles). Largest-component
postprocessing is then decided on the winner's cross-validation. All under `<results>/crossval/`; each
evaluated folder keeps an inputs.json (file names, sizes, mtimes, settings), so a rerun re-evaluates only
what changed. Inference is imported lazily: `import autoseg.evaluation` stays free of torch.
"""
from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoseg.dataset.contract import LabelDef
from autoseg.evaluation.contract import EvaluationError, EvaluationSummary
from autoseg.evaluation.evaluate import SUMMARY_NAME, evaluate_folder, load_summary
from autoseg.io.readers import SUPPORTED_ENDINGS, file_ending
from autoseg.log import get_logger
from autoseg.serialization import atomic_write, load_contract, read_json, save_contract, write_json

if TYPE_CHECKING:
    from autoseg.inference.postprocess import PostprocessingRules

log = get_logger("evaluation")

CROSSVAL_DIR = "crossval"
BEST_FILE = "best.json"
RULES_NAME = "postprocessing.json"
INSTRUCTIONS_FILE = "inference_instructions.txt"
STAMP_FILE = "inputs.json"
ALL_FOREGROUND = "all foreground"
BEST_FORMAT = 1


@dataclass(frozen=True)
class CandidateScore:
    """One evaluated setup: a configuration folder name, or `ensemble__A__B` with its two members."""

    name: str
    members: tuple[str, ...]  # model folder names (<configuration>__<plans>)
    dice: float | None  # foreground mean Dice of the cross-validation
    folder: str  # the cross-validation predictions that were evaluated


@dataclass(frozen=True)
class BestChoice:
    """What `find_best` writes to <results>/best.json: every candidate, the winner and its postprocessing."""

    dataset: str
    candidates: tuple[CandidateScore, ...]
    chosen: tuple[str, ...]  # model folder names of the winner: one, or two for an ensemble
    chosen_name: str
    postprocessing_file: str
    postprocessing_steps: tuple[str, ...]  # names of the label groups filtered, in order
    dice_before_postprocessing: float | None
    dice_after_postprocessing: float | None
    format: int = BEST_FORMAT


@dataclass(frozen=True)
class _Evaluation:
    """How every cross-validation folder is scored."""

    reference: Path
    labels: tuple[LabelDef, ...]
    file_ending: str
    ignore_label: int | None
    workers: int

    def run(self, folder: Path) -> EvaluationSummary:
        return evaluate_folder(folder, self.reference, self.labels, file_ending=self.file_ending,
                               ignore_label=self.ignore_label, workers=self.workers)


def collect_cross_validation(model_root: Path, output: Path) -> Path:
    """Merge the fold_k/validation predictions of one model folder into `output` and return it.

    Every fold of splits.json must have its validation predictions. CASE<ending> and CASE.npz are hard
    linked (copied across file systems); files of cases no fold validates are removed, so the folder
    holds exactly the cross-validation. prediction.json is written with all folds as its folds."""
    from autoseg.inference.info import probabilities_file

    root, output = Path(model_root), Path(output)
    per_fold = _validation_files(root)
    output.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}
    for fold, files in enumerate(per_fold):
        for case_id, label_file in files.items():
            if case_id in seen:
                raise EvaluationError(f"case {case_id} is validated in fold {seen[case_id]} and in fold {fold}",
                                      path=root / "splits.json", hint="fix splits.json so that each case is in one "
                                                                      "fold's val list, then retrain")
            seen[case_id] = fold
            _link(label_file, output / label_file.name)
            npz = probabilities_file(label_file)
            if npz.is_file():
                _link(npz, output / npz.name)
            else:
                (output / npz.name).unlink(missing_ok=True)
    _remove_stale(output, set(seen))
    _write_merged_info(root, output, len(per_fold))
    return output


def _validation_files(root: Path) -> list[dict[str, Path]]:
    """Per fold of splits.json: validation case id -> its predicted label file; errors name the fold to train."""
    dataset, (configuration, plans) = root.parent.name, root.name.rsplit("__", 1)
    configuration += "" if plans == "autoseg" else f" -p {plans}"  # what `autoseg train` needs to find it
    splits_file = root / "splits.json"
    if not splits_file.is_file():
        raise EvaluationError("no splits.json: not a trained model folder", path=root,
                              hint=f"autoseg train {dataset} {configuration} 0 (and the other folds)")
    splits = read_json(splits_file)
    if not isinstance(splits, list) or not all(isinstance(s, dict) and "val" in s for s in splits):
        raise EvaluationError('splits.json is not a list of {"train": [...], "val": [...]}', path=splits_file,
                              hint="restore the splits.json that training wrote")
    per_fold = []
    for fold, split in enumerate(splits):
        folder = root / f"fold_{fold}" / "validation"
        files = {case_id: _find_case(folder, case_id) for case_id in split["val"]}
        lacking = sorted(case_id for case_id, path in files.items() if path is None)
        if lacking:
            what = "no validation predictions" if not folder.is_dir() else \
                f"no validation prediction of {len(lacking)} case(s) ({', '.join(lacking[:3])})"
            raise EvaluationError(f"fold {fold} of {root.name} has {what}", path=folder,
                                  hint=f"train (and validate) the fold: autoseg train {dataset} {configuration} {fold}")
        per_fold.append({case_id: path for case_id, path in files.items() if path is not None})
    return per_fold


def _find_case(folder: Path, case_id: str) -> Path | None:
    return next((folder / f"{case_id}{e}" for e in SUPPORTED_ENDINGS if (folder / f"{case_id}{e}").is_file()), None)


def _link(source: Path, target: Path) -> None:
    """Hard link (else copy with times) `source` to `target`, unless `target` already is the same file."""
    if target.exists():
        old, new = target.stat(), source.stat()
        if (old.st_ino, old.st_dev) == (new.st_ino, new.st_dev) or \
                (old.st_size, old.st_mtime_ns) == (new.st_size, new.st_mtime_ns):
            return
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def _remove_stale(folder: Path, cases: set[str]) -> None:
    for path in folder.iterdir():
        ending = file_ending(path) or (".npz" if path.suffix == ".npz" else "")
        if ending and path.is_file() and path.name[: -len(ending)] not in cases:
            path.unlink()


def _write_merged_info(root: Path, output: Path, n_folds: int) -> None:
    from dataclasses import replace

    from autoseg.inference.info import INFO_FILE, probabilities_file, read_prediction_info, write_prediction_info

    source = root / "fold_0" / "validation"
    if not (source / INFO_FILE).is_file():
        log.info("%s has no prediction.json: %s cannot be ensembled", source, root.name)
        return
    has_npz = all(probabilities_file(path).is_file() for path in output.iterdir() if file_ending(path))
    info = replace(read_prediction_info(source), sources=(str(root.resolve()),),
                   folds=tuple(str(fold) for fold in range(n_folds)), probabilities=has_npz)
    write_prediction_info(output, info)


def find_best(
    results: Path, reference_dir: Path, labels: Sequence[LabelDef], *, file_ending: str,
    ignore_label: int | None = None, configurations: Sequence[str] | None = None, allow_ensembles: bool = True,
    workers: int = 1, plans_names: Sequence[str] | None = None,
) -> BestChoice:
    """Evaluate every configuration and pair ensemble of `results` (= <results>/<dataset name>) on
    cross-validation against `reference_dir` (labelsTr), pick the best, decide its postprocessing.

    `labels`: the dataset's labels (no background). `configurations`: model folder names (`3d_fullres__autoseg`,
    or `3d_fullres`); default: every folder with all folds validated, of `plans_names` only when given.
    Writes best.json, postprocessing.json and inference_instructions.txt into `results`."""
    results = Path(results)
    evaluation = _Evaluation(Path(reference_dir), tuple(label for label in labels if label.values != (0,)),
                             file_ending, ignore_label, workers)
    crossval = results / CROSSVAL_DIR
    candidates: list[CandidateScore] = []
    for root in _model_folders(results, configurations, plans_names):
        folder = collect_cross_validation(root, crossval / root.name)
        summary = _evaluate_cached(folder, evaluation, inputs=[folder])
        candidates.append(CandidateScore(root.name, (root.name,), summary.foreground_mean, str(folder)))
    if allow_ensembles:
        candidates += _score_ensembles(candidates, crossval, evaluation)
    best = max(candidates, key=lambda c: float("-inf") if c.dice is None else c.dice)
    log.info("best cross-validation: %s (foreground mean Dice %s)", best.name, best.dice)
    rules_file = results / RULES_NAME
    rules, after = _decide_postprocessing(Path(best.folder), crossval / f"{best.name}__postprocessed", rules_file,
                                          evaluation)
    choice = BestChoice(dataset=results.name, candidates=tuple(candidates), chosen=best.members,
                        chosen_name=best.name, postprocessing_file=str(rules_file.resolve()),
                        postprocessing_steps=tuple(rule.name for rule in rules.keep_largest),
                        dice_before_postprocessing=best.dice, dice_after_postprocessing=after.foreground_mean)
    save_contract(results / BEST_FILE, choice)
    text = inference_instructions(choice)
    atomic_write(results / INSTRUCTIONS_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return choice


def _model_folders(results: Path, configurations: Sequence[str] | None, plans_names: Sequence[str] | None
                   ) -> list[Path]:
    if not results.is_dir():
        raise EvaluationError("results folder not found", path=results, hint="train the dataset first")
    folders = sorted(p for p in results.iterdir() if p.is_dir() and "__" in p.name and p.name != CROSSVAL_DIR
                     and (not plans_names or p.name.rsplit("__", 1)[1] in plans_names))
    if configurations:
        return [_resolve_configuration(results, name, folders) for name in configurations]
    complete = []
    for folder in folders:
        try:
            _validation_files(folder)
            complete.append(folder)
        except EvaluationError as err:
            log.info("not a candidate: %s", err.message)
    if not complete:
        raise EvaluationError("no model folder has validation predictions for all its folds", path=results,
                              hint="train every fold of a configuration: autoseg train DATASET CONFIG FOLD")
    return complete


def _resolve_configuration(results: Path, name: str, folders: list[Path]) -> Path:
    matches = [p for p in folders if p.name == name] or [p for p in folders if p.name.rsplit("__", 1)[0] == name]
    if len(matches) != 1:
        known = ", ".join(p.name for p in folders) or "none"
        raise EvaluationError(f"configuration {name!r} matches {len(matches)} model folders", path=results,
                              hint=f"name one of: {known}")
    return matches[0]


def _score_ensembles(singles: list[CandidateScore], crossval: Path, evaluation: _Evaluation) -> list[CandidateScore]:
    """Every pair of configurations, ensembled from the probabilities of their cross-validations."""
    from autoseg.inference.ensemble import ensemble_folders

    scores = []
    for a, b in combinations(singles, 2):
        inputs = [Path(a.folder), Path(b.folder)]
        if not all(_has_probabilities(folder, evaluation.file_ending) for folder in inputs):
            log.info("no ensemble of %s and %s: their validation lacks probabilities (CASE.npz, prediction.json)",
                     a.name, b.name)
            continue
        folder = crossval / f"ensemble__{a.name}__{b.name}"
        build = partial(ensemble_folders, inputs, folder, overwrite=True, workers=evaluation.workers)
        summary = _evaluate_cached(folder, evaluation, inputs=inputs, build=build)
        scores.append(CandidateScore(folder.name, (a.name, b.name), summary.foreground_mean, str(folder)))
    return scores


def _has_probabilities(folder: Path, ending: str) -> bool:
    from autoseg.inference.info import probabilities_file

    labels = [p for p in folder.iterdir() if p.name.endswith(ending)]
    return (folder / "prediction.json").is_file() and bool(labels) and \
        all(probabilities_file(p).is_file() for p in labels)


def _stamp(inputs: Sequence[Path], evaluation: _Evaluation, extra: Any = None) -> dict[str, Any]:
    """What an evaluation depends on: the input case files (name, size, mtime), references and settings."""
    files: dict[str, list[int] | None] = {}
    for folder in inputs:
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith(".") and \
                    (path.name.endswith(evaluation.file_ending) or path.suffix == ".npz"):
                files[f"{folder.name}/{path.name}"] = [path.stat().st_size, path.stat().st_mtime_ns]
                if path.name.endswith(evaluation.file_ending):
                    reference = evaluation.reference / path.name
                    files[f"reference/{path.name}"] = [reference.stat().st_size, reference.stat().st_mtime_ns] \
                        if reference.is_file() else None
    settings = {"reference": str(evaluation.reference.resolve()), "ignore_label": evaluation.ignore_label,
                "labels": [[label.name, list(label.values)] for label in evaluation.labels], "extra": extra}
    return {"files": files, "settings": settings}


def _evaluate_cached(folder: Path, evaluation: _Evaluation, *, inputs: Sequence[Path],
                     build: Callable[[], object] | None = None) -> EvaluationSummary:
    """folder/summary.json if its inputs are unchanged since it was written; else (build and) evaluate."""
    stamp = _stamp(inputs, evaluation)
    if _stamp_matches(folder, stamp):
        log.info("%s: inputs unchanged, reusing %s", folder.name, SUMMARY_NAME)
        return load_summary(folder / SUMMARY_NAME)
    if build is not None:
        build()
    summary = evaluation.run(folder)
    write_json(folder / STAMP_FILE, stamp)
    return summary


def _stamp_matches(folder: Path, stamp: dict[str, Any]) -> bool:
    files = (folder / STAMP_FILE, folder / SUMMARY_NAME)
    return all(path.is_file() for path in files) and read_json(folder / STAMP_FILE) == stamp


def _decide_postprocessing(source: Path, target: Path, rules_file: Path, evaluation: _Evaluation
                           ) -> tuple[PostprocessingRules, EvaluationSummary]:
    """nnU-Net's greedy choice: largest component of all foreground, then of each label (if several).

    All-foreground is kept when the foreground mean Dice strictly improves and no label's mean Dice drops;
    a label's filter is kept when that label's mean Dice strictly improves (on top of the rules kept so
    far). `target` ends up holding the postprocessed cross-validation with its summary.json.
    """
    from autoseg.inference.postprocess import ComponentRule, PostprocessingRules, load_rules, save_rules

    stamp = _stamp([source], evaluation, extra=str(source.resolve()))
    if _stamp_matches(target, stamp) and rules_file.is_file():
        rules = load_rules(rules_file)
        if rules.decided_on == str(source.resolve()):
            log.info("%s: inputs unchanged, reusing %s (%s)", target.name, rules_file.name, rules.describe())
            return rules, load_summary(target / SUMMARY_NAME)
    base = load_summary(source / SUMMARY_NAME)
    foreground = tuple(sorted({value for label in evaluation.labels for value in label.values}))
    kept: list[ComponentRule] = []
    current, tried = base, None
    groups = [ComponentRule(ALL_FOREGROUND, foreground)]
    if len(evaluation.labels) > 1:
        groups += [ComponentRule(label.name, tuple(label.values)) for label in evaluation.labels]
    for rule in groups:
        tried = (*kept, rule)
        summary = _postprocessed(source, target, PostprocessingRules(tried), evaluation)
        if rule.name == ALL_FOREGROUND:
            before, after = current.foreground_mean, summary.foreground_mean
            accept = _better(after, before) and not any(
                _worse(summary.mean[name].dice, mean.dice) for name, mean in current.mean.items())
        else:
            before, after = current.mean[rule.name].dice, summary.mean[rule.name].dice
            accept = _better(after, before)
        log.info("largest component of %s: Dice %s -> %s, %s", rule.name, _fmt(before), _fmt(after),
                 "kept" if accept else "not kept")
        if accept:
            kept.append(rule)
            current = summary
    rules = PostprocessingRules(tuple(kept), decided_on=str(source.resolve()))
    if tried != rules.keep_largest:  # the last trial was rejected: rewrite the folder with the kept rules
        current = _postprocessed(source, target, rules, evaluation)
    save_rules(rules_file, rules)
    write_json(target / STAMP_FILE, stamp)
    return rules, current


def _postprocessed(source: Path, target: Path, rules: PostprocessingRules, evaluation: _Evaluation
                   ) -> EvaluationSummary:
    from autoseg.inference.postprocess import postprocess_folder

    postprocess_folder(source, target, rules, file_ending=evaluation.file_ending, overwrite=True,
                       workers=evaluation.workers)
    return evaluation.run(target)


def _better(after: float | None, before: float | None) -> bool:
    return after is not None and (before is None or after > before)


def _worse(after: float | None, before: float | None) -> bool:
    return before is not None and (after is None or after < before)


def inference_instructions(choice: BestChoice) -> str:
    """The commands that reproduce the chosen setup on new scans (INPUT: a folder of CASE_XXXX files)."""
    lines = [f"Best setup for {choice.dataset}: {choice.chosen_name}",
             f"cross-validation foreground mean Dice: {_fmt(choice.dice_before_postprocessing)}, after "
             f"postprocessing: {_fmt(choice.dice_after_postprocessing)} "
             f"({', '.join(choice.postprocessing_steps) or 'no filter kept'})", "", "candidates:"]
    lines += [f"  {c.name}: {_fmt(c.dice)}" for c in choice.candidates]
    lines += ["", "to segment new scans (INPUT: a folder of CASE_0000 ... files):"]
    ensemble = len(choice.chosen) > 1
    outputs = ["OUT_A", "OUT_B"] if ensemble else ["OUTPUT"]
    for folder, output in zip(choice.chosen, outputs):
        configuration, plans = folder.rsplit("__", 1)
        lines.append(f"autoseg predict -i INPUT -o {output} -d {shlex.quote(choice.dataset)} -c {configuration} "
                     f"--plans {plans}" + (" --save-probabilities" if ensemble else ""))
    if ensemble:
        lines.append("autoseg ensemble -i OUT_A OUT_B -o OUTPUT")
    lines.append(f"autoseg postprocess -i OUTPUT -o OUTPUT_PP --rules {shlex.quote(choice.postprocessing_file)}")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def load_best(path: Path) -> BestChoice:
    """Read best.json written by `find_best`."""
    return load_contract(path, BestChoice, rerun="autoseg find-best DATASET")
