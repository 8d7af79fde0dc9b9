"""Training records: metrics.jsonl (one line per epoch), progress.png drawn from it, a plain log file.

The JSON lines file is the source of truth: plots and reports are drawn from it, and a resumed run
drops the lines of epochs after its checkpoint so the record matches the weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from autoseg.serialization import atomic_write


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All epoch records; a torn last line (a crash mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def keep_metrics_until(path: Path, last_epoch: int) -> None:
    """Drop records of epochs after `last_epoch` (they belong to a run that was interrupted)."""
    kept = [r for r in read_metrics(path) if r.get("epoch", -1) <= last_epoch]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def plot_progress(records: list[dict[str, Any]], path: Path) -> None:
    """Losses, pseudo-Dice (per class and its moving average), learning rate and epoch time."""
    if not records:
        return
    import matplotlib.pyplot as plt

    fig = progress_figure(records)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


#: Below this many epochs every point gets a marker: a line through one point draws nothing.
MARKERS_UP_TO = 30


def progress_figure(records: list[dict[str, Any]]) -> Any:
    """The progress figure (matplotlib, Agg): markers on the points while there are few epochs, and one
    colour per class (a colour map, not the 10-colour cycle that repeats from the 11th class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    style = {"marker": "o", "markersize": 3} if len(records) <= MARKERS_UP_TO else {}
    fig, axes = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    axes[0].plot(epochs, [r["train_loss"] for r in records], color="tab:blue", label="train loss", **style)
    if any("val_loss" in r for r in records):
        axes[0].plot(epochs, [r.get("val_loss") for r in records], color="tab:red", label="validation loss", **style)
    axes[0].set_ylabel("loss")
    twin = axes[0].twinx()
    names = list(records[-1].get("pseudo_dice", {}))
    colours = class_colours(len(names))
    for name, colour in zip(names, colours):
        twin.plot(epochs, [r.get("pseudo_dice", {}).get(name) for r in records], ":", color=colour,
                  label=f"dice {name}", **style)
    twin.plot(epochs, [r.get("ema_dice") for r in records], "k-", label="pseudo-Dice (EMA)", **style)
    twin.set_ylabel("pseudo-Dice")
    axes[0].legend(loc="upper left")
    twin.legend(loc="lower left", ncol=max(1, len(names) // 12 + 1), fontsize="small")
    axes[1].plot(epochs, [r["lr"] for r in records], **style)
    axes[1].set_ylabel("learning rate")
    axes[2].plot(epochs, [r["epoch_seconds"] for r in records], **style)
    axes[2].set_ylabel("epoch time (s)")
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    return fig


def class_colours(count: int) -> list[tuple[float, ...]]:
    """`count` distinct colours: tab20's for up to 20 classes, evenly spaced hues beyond."""
    from matplotlib import colormaps

    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["hsv"](i / count) for i in range(count)]


def attach_log_file(path: Path) -> logging.Handler:
    """Send autoseg's log to a plain file that is flushed on every line (clusters tail it)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("autoseg")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    logging.getLogger("autoseg").removeHandler(handler)
    handler.close()
