"""Plot loss curves of one or more runs: ``python -m llm.plot RUN_DIR [RUN_DIR ...] --out loss.png``.

Reads each run's ``metrics.jsonl`` and draws training loss (``train`` records,
``loss``) as solid lines and validation loss (``val`` records, ``val_loss``)
as dashed lines with markers, against the optimizer step, one colour per run;
a curve of one point is drawn as a dot.
When training records carry ``lr``, a second panel below shows the learning
rate. Needs matplotlib (``pip install matplotlib``); the image is written
atomically, so a viewer never sees half a file.

``--out`` never writes over anything but an earlier image: its suffix must be
a format matplotlib writes (.png, .pdf, .svg, ...), a file already there is
replaced only if its first bytes are those of that format, and nothing is
written inside a checkpoint folder.

Exit codes: 0 written; 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, NoReturn

from llm.cli import ArgParser, run_program, run_tool
from llm.errors import UsageError
from llm.files import refuse_checkpoint_folder, replacing

Curve = list[tuple[int, float]]
"""(step, value) pairs, sorted by step."""

MAX_PIXELS = 65535
"""Agg's limit on each side of an image."""
MIN_PIXELS = 16
"""The smallest side worth drawing; below one pixel there is no image to write."""

IMAGE_STARTS = {
    "png": (b"\x89PNG\r\n\x1a\n",), "jpg": (b"\xff\xd8\xff",), "jpeg": (b"\xff\xd8\xff",),
    "gif": (b"GIF87a", b"GIF89a"), "tif": (b"II*\0", b"MM\0*"), "tiff": (b"II*\0", b"MM\0*"),
    "webp": (b"RIFF",), "pdf": (b"%PDF-",), "ps": (b"%!PS",), "eps": (b"%!PS",),
    "svg": (b"<?xml", b"<svg"), "svgz": (b"\x1f\x8b",), "raw": (), "rgba": (),
}
"""The formats written, and how a file of each begins. Raw and rgba pixels have no header: they are
written only as a new file, since nothing tells an earlier plot from someone's data. Others matplotlib
may offer are not: pgf needs a LaTeX install, and avif's header is not at its start."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgParser(prog="llm-plot", description="Plot the loss curves of one or more runs.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=Path("loss.png"),
                        help="the image to write; its suffix picks the format (.png, .pdf, .svg, ...); "
                             "a file already there is replaced only if it is an image of that format "
                             "(by its first bytes), never inside a checkpoint folder (default: loss.png)")
    parser.add_argument("--width", type=float, default=10.0, help="figure width in inches (default: 10)")
    parser.add_argument("--height", type=float, default=6.0, help="figure height in inches (default: 6)")
    parser.add_argument("--dpi", type=float, default=100.0, help="pixels per inch (default: 100)")
    return parser


def read_curves(run_dir: Path) -> dict[str, Curve]:
    """The ``train`` loss, ``val`` loss and ``lr`` curves of a run; UsageError when it has no loss."""
    if not run_dir.is_dir():
        what = "is a file, not a run directory" if run_dir.exists() else "no such run directory"
        raise UsageError(f"{run_dir}: {what}")
    path = run_dir / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageError(f"{run_dir} has no metrics.jsonl: is it a run directory?") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not text (byte {e.start} is not UTF-8): is it a run's metrics.jsonl?") from None

    # a dict per curve: should a step have two records (a file appended to by hand), the later one wins
    points: dict[str, dict[int, float]] = {"train": {}, "val": {}, "lr": {}}
    wanted = {("train", "loss"): "train", ("val", "val_loss"): "val", ("train", "lr"): "lr"}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested thousands deep
            if number == len(lines):
                break  # a live run may be writing its last line right now
            raise UsageError(f"{path} line {number}: not valid JSON") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2**63:
            raise UsageError(f"{path} line {number}: expected a record with an integer step (from 0 to 2**63-1)")
        for (split, key), curve in wanted.items():
            value = record.get(key)
            # not finite (null, as the engine writes it; NaN, as json.dumps does): kept, the line breaks there
            if record.get("split") == split and (_is_number(value) or (value is None and key in record)):
                points[curve][record["step"]] = math.nan if value is None else _finite_or_nan(value)
    losses = [*points["train"].values(), *points["val"].values()]
    if not losses:
        raise UsageError(f"{path} has no loss records (train 'loss' or val 'val_loss')")
    if not any(map(math.isfinite, losses)):
        raise UsageError(f"{path}: all {len(losses)} of its losses are NaN or infinite, so there is no curve to draw")
    return {name: sorted(curve.items()) for name, curve in points.items()}


def _finite_or_nan(value: float) -> float:
    """``value`` as a float, NaN where it is infinite or too large for one (an integer of 400 digits)."""
    try:
        number = float(value)
    except OverflowError:
        return math.nan
    return number if math.isfinite(number) else math.nan


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def labels(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, or the path as given when two runs share a name; no two runs get the same label."""
    names = [_drawable(d.resolve().name or str(d)) for d in run_dirs]
    shown = [name if names.count(name) == 1 else _drawable(str(d)) for name, d in zip(names, run_dirs)]
    # Paths that differ only in bytes that are not UTF-8 (r\xff and r\xfe in one folder) still read the same.
    # The runs are keyed by label, so a second run under one would replace the first: it is numbered instead.
    unique: list[str] = []
    for label in shown:
        candidate, number = label, 1
        while candidate in unique:
            number += 1
            candidate = f"{label} ({number})"
        unique.append(candidate)
    return unique


def _drawable(text: str) -> str:
    """``text`` with the lone surrogates of a name that is not UTF-8, which no font draws, as replacement characters."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def draw(runs: dict[str, dict[str, Curve]], width: float, height: float, dpi: float) -> Any:
    """A matplotlib Figure: loss above, learning rate below when any run logged it."""
    # Figure + the Agg canvas, not pyplot: no global figure state and no GUI backend to pick
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    if any(curves["lr"] for curves in runs.values()):
        loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        loss_ax, lr_ax = fig.subplots(), None
    for i, (name, curves) in enumerate(runs.items()):
        color = f"C{i % 10}"  # one colour per run, train and val alike
        # a folder name is text, not markup: "$" would start maths, and a leading "_" hides the legend entry
        label = ("\u200b" if name.startswith("_") else "") + name.replace("$", r"\$")
        if curves["train"]:
            _plot(loss_ax, curves["train"], color=color, linewidth=1.5, label=f"{label} train")
        if curves["val"]:
            _plot(loss_ax, curves["val"], color=color, linestyle="--", marker="o", label=f"{label} val")
        if lr_ax is not None and curves["lr"]:
            _plot(lr_ax, curves["lr"], color=color, linewidth=1.5, label=label)
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize="small")
    loss_ax.grid(alpha=0.3)
    if lr_ax is not None:
        lr_ax.set_ylabel("learning rate")
        lr_ax.grid(alpha=0.3)
    (lr_ax or loss_ax).set_xlabel("step")
    return fig


def _plot(ax: Any, curve: Curve, **style: Any) -> None:
    if len(curve) == 1:  # a line through one point draws nothing: a run shorter than log_every_steps logs just one
        style.setdefault("marker", "o")
    ax.plot(*zip(*curve), markersize=4, **style)
    lost = [step for step, value in curve if math.isnan(value)]
    if lost:  # a gap in the line, and an x at the top of the axes over each step whose value was NaN or infinite
        ax.scatter(lost, [1.0] * len(lost), marker="x", color=style["color"], clip_on=False,
                   transform=ax.get_xaxis_transform(), label=f"{style.get('label', '')} NaN or inf".strip())


def check_out(out: Path) -> str:
    """The format ``out`` names; UsageError unless writing it can only add or replace a plot."""
    try:  # the first use of matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise UsageError("llm.plot needs matplotlib: pip install matplotlib") from None

    written = sorted(IMAGE_STARTS.keys() & FigureCanvasAgg.get_supported_filetypes().keys())
    formats = ", ".join(f".{name}" for name in written)
    refuse_checkpoint_folder(out, "write the plot elsewhere")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder: name the image to write, such as {out / 'loss.png'}")
    fmt = out.suffix[1:].lower()
    if not fmt:
        raise UsageError(f"--out {out} has no suffix to pick the image format: end it in one of {formats}")
    if fmt not in written:
        raise UsageError(f"--out {out}: cannot write .{fmt} files, expected one of {formats}")
    if out.exists() and not out.is_file():  # a named pipe or a device: opening it to read its first bytes may block
        raise UsageError(f"--out {out} exists and is not a regular file, so it is left as it is: choose another --out")
    if out.exists() and not _starts_as(out, IMAGE_STARTS.get(fmt, ())):
        raise UsageError(f"--out {out} exists and is not a .{fmt} image (by its first bytes), so it is left "
                         f"as it is: choose another --out")
    return fmt


def _starts_as(path: Path, starts: tuple[bytes, ...]) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(max(map(len, starts), default=0))
    except OSError:
        return False  # unreadable: certainly not known to be an earlier plot
    return any(head.startswith(start) for start in starts)


def save(fig: Any, out: Path, fmt: str, dpi: float) -> None:
    """Write the figure to ``out`` through a temporary file beside it, then rename; its folder is made if need be."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with replacing(out) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, format=fmt, dpi=dpi)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    return run_tool(lambda: _plot_runs(argv), if_interrupted="no figure written")  # written whole or not at all


def _plot_runs(argv: list[str] | None) -> str:
    args = build_parser().parse_args(argv)
    for flag in ("width", "height", "dpi"):
        if not getattr(args, flag) > 0:
            raise UsageError(f"--{flag}: got {getattr(args, flag):g}, expected a number > 0")
    if max(args.width, args.height) * args.dpi > MAX_PIXELS:
        raise UsageError(f"--width/--height x --dpi: at most {MAX_PIXELS} pixels a side")
    if min(args.width, args.height) * args.dpi < MIN_PIXELS:
        raise UsageError(f"--width/--height x --dpi: at least {MIN_PIXELS} pixels a side")
    seen: dict[Path, Path] = {}
    for d in args.run_dirs:  # one curve each: a run given twice would be drawn once, its legend one short
        first = seen.setdefault(d.resolve(), d)
        if first is not d:
            raise UsageError(f"{d} is given twice{'' if str(first) == str(d) else f' (as {first} too)'}: "
                             f"name each run once")
    runs = {label: read_curves(d) for label, d in zip(labels(args.run_dirs), args.run_dirs)}
    fmt = check_out(args.out)
    save(draw(runs, args.width, args.height, args.dpi), args.out, fmt, args.dpi)
    return str(args.out)


def run() -> NoReturn:
    """The command line's entry (llm-plot, ``python -m llm.plot``): main() as a process (cli.run_program)."""
    run_program(main)


if __name__ == "__main__":
    run()
