"""python -m llm.plot: the real command on fake run directories, the image checked with PIL."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from llm.plot import draw, labels, main, read_curves
from tests.helpers import run

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two cycle colours: run 1 and run 2
PNG_START = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, scale: float = 1.0, lr: bool = True, extra: str = "") -> Path:
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(10, 201, 10):
        record = {"split": "train", "step": step, "epoch": step // 100, "loss": scale * (2 + math.exp(-step / 50))}
        if lr:
            record["lr"] = 1e-3 * min(1.0, step / 50)
        lines.append(json.dumps(record))
        if step % 50 == 0:
            lines.append(json.dumps({"split": "val", "step": step, "epoch": 0, "val_loss": scale * (2.2 + math.exp(-step / 50))}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + extra)
    return run_dir


def plot(*args: str | Path, cwd: Path):
    return run([sys.executable, "-m", "llm.plot", *map(str, args)], cwd=cwd, timeout=60)


def colours(path: Path) -> set[tuple[int, int, int]]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return {rgba[:3] for _, rgba in image.convert("RGBA").getcolors(maxcolors=1 << 20)}


def size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def assert_usage_error(result, *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0]


def test_two_runs_overlaid_in_a_png_of_the_asked_size(tmp_path):
    a = write_run(tmp_path / "runs" / "a")
    b = write_run(tmp_path / "runs" / "b", scale=0.8, lr=False)
    out = tmp_path / "plots" / "loss.png"  # in a folder made for it
    result = plot(a, b, "--out", out, "--width", 4, "--height", 3, "--dpi", 80, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert size(out) == (4 * 80, 3 * 80)
    found = colours(out)
    assert len(found) > 20  # lines, text and antialiasing: far from a blank canvas
    assert BLUE in found and ORANGE in found  # both runs were drawn
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]  # no temporary file left beside it


def test_default_size_replaces_an_existing_image(tmp_path):
    write_run(tmp_path / "only", lr=False)
    (tmp_path / "loss.png").write_bytes(PNG_START + b"an old plot")
    result = plot("only", cwd=tmp_path)  # --out defaults to loss.png in the working directory

    assert result.returncode == 0, result.stderr
    assert size(tmp_path / "loss.png") == (1000, 600) and len(colours(tmp_path / "loss.png")) > 20


def test_read_curves_keeps_the_later_record_of_a_step_and_skips_what_is_not_loss(tmp_path):
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    records = [
        {"split": "train", "step": 2, "epoch": 0, "loss": 3.0, "lr": 0.1},
        {"split": "train", "step": 4, "epoch": 0, "loss": 2.0, "lr": 0.1},
        {"split": "val", "step": 4, "epoch": 0, "val_loss": 2.5},
        {"split": "epoch", "step": 4, "epoch": 1, "train_loss": 2.0, "val_loss": 2.5, "lr": 0.2},
        {"split": "train", "step": 4, "epoch": 0, "loss": 1.5, "lr": 0.05},  # resumed from the checkpoint at step 2
        {"split": "train", "step": 6, "epoch": 1, "loss": float("nan")},
    ]
    text = "\n".join(json.dumps(r) for r in records) + '\n{"split": "train", "st'  # the live run's unfinished line
    (run_dir / "metrics.jsonl").write_text(text)

    curves = read_curves(run_dir)
    (step, lost), = curves["train"][2:]  # a NaN loss stays, as a gap in the line
    assert step == 6 and math.isnan(lost)
    assert curves == {"train": [(2, 3.0), (4, 1.5), (6, lost)], "val": [(4, 2.5)], "lr": [(2, 0.1), (4, 0.05)]}


def test_non_finite_losses_break_the_line_and_are_marked_and_all_of_them_is_an_error(tmp_path):
    run_dir = tmp_path / "diverged"
    run_dir.mkdir()
    # null: what the engine writes for a loss that is not finite; NaN and Infinity: what json.dumps writes
    losses = [1.0, float("nan"), float("inf"), 0.5, 10**400, None]  # 10**400: no float holds it, as good as infinite
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"split": "train", "step": i + 1, "epoch": 0, "loss": v}) + "\n" for i, v in enumerate(losses)))
    assert [math.isnan(v) for _, v in read_curves(run_dir)["train"]] == [False, True, True, False, True, True]
    [marks] = draw({"diverged": read_curves(run_dir)}, 4, 3, 50).axes[0].collections  # an x over steps 2, 3, 5, 6
    assert [x for x, _ in marks.get_offsets()] == [2, 3, 5, 6]
    result = plot("diverged", "--out", "a.png", cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "a.png").is_file(), result.stderr
    (run_dir / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 1, "epoch": 0, "loss": None}) + "\n"
                                           + json.dumps({"split": "train", "step": 2, "epoch": 0, "loss": float("nan")}))
    assert_usage_error(plot("diverged", "--out", "c.png", cwd=tmp_path),
                       "all 2 of its losses are NaN or infinite, so there is no curve to draw")


def test_labels_are_folder_names_unless_two_runs_share_one(tmp_path):
    assert labels([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
    assert labels([tmp_path / "x" / "run", tmp_path / "y" / "run", tmp_path / "z"]) == [
        str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run"), "z"]


def test_a_folder_name_that_is_not_utf8_is_drawn_with_replacement_characters(tmp_path):
    name = b"r\xff".decode("utf-8", "surrogateescape")  # what Python makes of such a name on the command line
    assert labels([tmp_path / name]) == ["r\ufffd"]
    out = tmp_path / "x.png"
    assert main([str(write_run(tmp_path / name)), "--out", str(out)]) == 0 and size(out)[0] > 0


def test_runs_whose_names_read_the_same_once_drawn_get_labels_of_their_own(tmp_path):
    r_ff = b"r\xff".decode("utf-8", "surrogateescape")  # as Python reads such names from the command line
    r_fe = b"r\xfe".decode("utf-8", "surrogateescape")
    assert labels([tmp_path / "a" / r_ff, tmp_path / "b" / r_fe]) == [
        str(tmp_path / "a" / "r\ufffd"), str(tmp_path / "b" / "r\ufffd")]
    assert labels([tmp_path / r_ff, tmp_path / r_fe]) == [str(tmp_path / "r\ufffd"), str(tmp_path / "r\ufffd") + " (2)"]
    out = tmp_path / "x.png"
    assert main([str(write_run(tmp_path / r_ff)), str(write_run(tmp_path / r_fe, scale=0.8)), "--out", str(out)]) == 0
    assert BLUE in colours(out) and ORANGE in colours(out)  # both runs were drawn, neither replaced by the other


def test_folder_names_are_shown_as_written_in_the_legend(tmp_path):
    import io

    from llm.plot import draw

    names = ["_base", r"lr$\frac{$", "plain"]  # "$" would start maths; a leading "_" would hide the entry
    runs = {name: read_curves(write_run(tmp_path / str(i), lr=False)) for i, name in enumerate(names)}
    fig = draw(runs, 4, 3, 50)
    fig.savefig(io.BytesIO(), format="png")  # the maths parser would raise on the second name
    shown = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert [t.replace("\u200b", "").replace(r"\$", "$") for t in shown] == [
        f"{name} {split}" for name in names for split in ("train", "val")]


def test_a_curve_of_one_point_is_a_dot_and_a_longer_one_a_plain_line(tmp_path):
    from llm.plot import draw

    short = tmp_path / "short"  # ran fewer steps than logging.log_every_steps: one train record
    short.mkdir()
    (short / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 5, "loss": 2.0, "lr": 0.1}) + "\n")
    fig = draw({"short": read_curves(short), "long": read_curves(write_run(tmp_path / "long"))}, 4, 3, 50)

    loss_ax, lr_ax = fig.axes
    markers = {line.get_label(): (line.get_marker(), len(line.get_xdata())) for line in loss_ax.get_lines()}
    assert markers == {"short train": ("o", 1), "long train": ("None", 20), "long val": ("o", 4)}
    assert [(line.get_marker(), len(line.get_xdata())) for line in lr_ax.get_lines()] == [("o", 1), ("None", 20)]


@pytest.mark.parametrize("line, expected", [
    ("not json", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # nested past what the JSON reader follows
    (json.dumps({"split": "train", "step": 10**400, "loss": 1.0}), "expected a record with an integer step"),
])
def test_a_bad_line_in_the_middle_is_an_error_naming_it(tmp_path, capsys, line, expected):
    run_dir = write_run(tmp_path / "bad")  # 20 train and 4 val lines
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(line + "\n" + json.dumps({"split": "train", "step": 300, "loss": 1.0}) + "\n")
    assert main([str(run_dir), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {run_dir / 'metrics.jsonl'} line 25: {expected}")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("case, expected", [
    ("missing run dir", ["missing: no such run directory"]),
    ("no metrics.jsonl", ["empty has no metrics.jsonl"]),
    ("no loss records", ["has no loss records"]),
    ("binary metrics", ["metrics.jsonl is not text (byte 0 is not UTF-8)"]),
    ("out below a file", ["cannot write", "metrics.jsonl/loss.png"]),
    ("out is a directory", ["taken is a folder", "taken/loss.png"]),
    ("unknown format", ["cannot write .txt files"]),
    ("format needing latex", ["cannot write .pgf files, expected one of .eps,"]),
    ("format without a header at its start", ["cannot write .avif files"]),
    ("metrics file for its run", ["metrics.jsonl: is a file, not a run directory"]),
    ("run given twice", ["error: good is given twice (as /", "/good too): name each run once"]),
    ("zero dpi", ["--dpi: got 0, expected a number > 0"]),
    ("tiny dpi", ["--width/--height x --dpi: at least 16 pixels a side"]),
    ("unknown flag", ["unrecognized arguments: --colour"]),
])
def test_bad_input_exits_2_with_one_line(tmp_path, case, expected):
    good = write_run(tmp_path / "good")
    (tmp_path / "empty").mkdir()
    write_run(tmp_path / "lr_only")
    (tmp_path / "lr_only" / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 1, "lr": 0.1}) + "\n")
    (tmp_path / "taken").mkdir()
    write_run(tmp_path / "binary")
    (tmp_path / "binary" / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    out = tmp_path / "out.png"
    args = {
        "missing run dir": [good, tmp_path / "missing", "--out", out],
        "no metrics.jsonl": [tmp_path / "empty", "--out", out],
        "no loss records": [tmp_path / "lr_only", "--out", out],
        "binary metrics": [tmp_path / "binary", "--out", out],
        "out below a file": [good, "--out", good / "metrics.jsonl" / "loss.png"],
        "out is a directory": [good, "--out", tmp_path / "taken"],
        "unknown format": [good, "--out", tmp_path / "loss.txt"],
        "format needing latex": [good, "--out", tmp_path / "loss.pgf"],
        "format without a header at its start": [good, "--out", tmp_path / "loss.avif"],
        "metrics file for its run": [good / "metrics.jsonl", "--out", out],
        "run given twice": [good, "good", "--out", out],
        "zero dpi": [good, "--out", out, "--dpi", 0],
        "tiny dpi": [good, "--out", out, "--dpi", 0.01],
        "unknown flag": [good, "--out", out, "--colour", "red"],
    }[case]
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    assert_usage_error(plot(*args, cwd=tmp_path), *expected)
    # nothing written: not out.png, nor whichever file the case names, nor a temporary file
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


def write_checkpoints(run_dir: Path) -> Path:
    """A run's checkpoint folder as training leaves it: the latest pointer beside a step folder."""
    step = run_dir / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text("{}")
    (step / "state.pt").write_bytes(b"weights")
    (run_dir / "checkpoints" / "latest").write_text("step_00000010\n")
    return run_dir / "checkpoints"


@pytest.mark.parametrize("case, expected", [
    ("checkpoint pointer", ["checkpoints/latest", "would write into a checkpoint folder"]),
    ("new file in the checkpoint folder", ["checkpoints/loss.png", "would write into a checkpoint folder"]),
    ("new file in a checkpoint", ["step_00000010/loss.png", "would write into a checkpoint folder"]),
    ("no suffix", ["notes has no suffix", ".png", ".pdf", ".svg"]),
    ("new file without a suffix", ["loss has no suffix", ".png"]),
    ("text in a .png", ["report.png exists and is not a .png image (by its first bytes)", "choose another --out"]),
    ("a png named .pdf", ["plot.pdf exists and is not a .pdf image"]),
    ("raw data", ["data.raw exists and is not a .raw image"]),
    ("named pipe", ["pipe.png exists and is not a regular file", "choose another --out"]),
])
def test_out_over_a_file_that_is_not_an_image_of_its_format_is_refused_and_left_alone(tmp_path, case, expected):
    good = write_run(tmp_path / "good")
    checkpoints = write_checkpoints(good)
    (tmp_path / "notes").write_text("my notes")
    (tmp_path / "report.png").write_text("not an image")
    (tmp_path / "plot.pdf").write_bytes(PNG_START + b"...")
    (tmp_path / "data.raw").write_bytes(bytes(range(256)))  # raw pixels have no header to recognise
    # Opening a named pipe to read its first bytes waits for a writer that never comes: plot()'s timeout ends it.
    os.mkfifo(tmp_path / "pipe.png")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    out = {
        "checkpoint pointer": checkpoints / "latest",
        "new file in the checkpoint folder": checkpoints / "loss.png",
        "new file in a checkpoint": checkpoints / "step_00000010" / "loss.png",
        "no suffix": tmp_path / "notes",
        "new file without a suffix": tmp_path / "loss",
        "text in a .png": tmp_path / "report.png",
        "a png named .pdf": tmp_path / "plot.pdf",
        "raw data": tmp_path / "data.raw",
        "named pipe": tmp_path / "pipe.png",
    }[case]
    assert_usage_error(plot(good, "--out", out, cwd=tmp_path), *expected)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written or changed


def test_an_earlier_image_of_another_format_is_replaced(tmp_path):
    run_dir = write_run(tmp_path / "run", lr=False)
    (tmp_path / "loss.svg").write_text('<?xml version="1.0"?><svg/>')
    result = plot(run_dir, "--out", "loss.svg", "--width", 2, "--height", 2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "loss.svg").read_text()
    assert text.startswith("<?xml") and "<path" in text and len(text) > 1000


def test_without_matplotlib_exits_2_with_the_install_line(tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    assert main([str(write_run(tmp_path / "run")), "--out", str(tmp_path / "loss.png")]) == 2
    assert capsys.readouterr().err == "error: llm.plot needs matplotlib: pip install matplotlib\n"
    assert not (tmp_path / "loss.png").exists()


def test_a_reader_of_stdout_that_went_away_costs_no_traceback(tmp_path):
    import subprocess

    write_run(tmp_path / "a")
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `llm-plot ... | head -c 0` leaves it
    try:
        out = subprocess.run([sys.executable, "-m", "llm.plot", "a", "--out", "a.png"], cwd=tmp_path,
                             stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert (tmp_path / "a.png").is_file()
