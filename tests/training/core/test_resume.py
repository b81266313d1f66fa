import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml

from llm.errors import UsageError
from llm.training.core import resume
from llm.training.core.callbacks import Callback, CallbackError, EarlyStopping, flatten
from llm.training.core.checkpoint import load_shared_state
from llm.training.core.engine import TrainingEngine
from llm.training.core.optim import lr_factor
from llm.training.core.registry import resolve_task
from llm.training.core.resume import (batches_done_in_epoch, change, check_changes, config_changes, course_changes,
                                      keep_optimizer_settings)
from llm.training.core.signals import TrainingInterrupted
from llm.training.tasks.regression_task import RegressionTask
from llm.training.train import default_callbacks
from tests.helpers import CrashAt, LearningRates, records_of, tiny_config, train, weights


def test_the_position_in_an_epoch_converts_across_processes_and_batch_sizes():
    progress = {"batch_in_epoch": 6, "world_size": 2}  # 6 batches of 8 on each of 2 ranks: 96 samples done
    assert batches_done_in_epoch(progress, 8, 8, 2) == 6
    assert batches_done_in_epoch(progress, 8, 16, 1) == 6
    assert batches_done_in_epoch(progress, 8, 4, 4) == 6
    assert batches_done_in_epoch(progress, 8, 32, 1) == 3
    with pytest.warns(UserWarning, match="1 process.* of batch 10: 6 samples of the epoch are seen again"):
        assert batches_done_in_epoch(progress, 8, 10, 1) == 9


def test_loader_workers_changed_from_or_to_none_say_the_run_is_no_longer_exact():
    # with workers a data set's random numbers come from each batch's seed; without, from the main process
    assert change("data.num_workers", {"data.num_workers": 2}, {"data.num_workers": 4}) == "data.num_workers (2 -> 4)"
    for before, after in ((0, 2), (2, 0)):
        said = change("data.num_workers", {"data.num_workers": before}, {"data.num_workers": after})
        assert said.startswith(f"data.num_workers ({before} -> {after}; what a data set draws at random")
        assert said.endswith("not bit for bit as it would have)")


def test_config_changes_lists_what_changed_and_refuses_what_binds_unless_allowed():
    saved = {"task": "lm", "training.epochs": 2, "data.num_workers": 0, "world_size": 1, "checkpoint.resume": "",
             "checkpoint.allow_config_change": True}
    now = {**saved, "training.epochs": 4, "data.num_workers": 2, "checkpoint.resume": "auto",
           "checkpoint.allow_config_change": False}  # how to resume is no change of the run
    assert config_changes(saved, now) == ["data.num_workers", "training.epochs"]
    check_changes(config_changes(saved, now), allowed=False, path=Path("ckpt"))  # nothing that binds
    binding = config_changes(saved, {**now, "world_size": 2, "model.n_layer": 6})
    with pytest.raises(UsageError, match=r"cannot resume ckpt: model\.n_layer, world_size changed"):
        check_changes(binding, allowed=False, path=Path("ckpt"))
    check_changes(binding, allowed=True, path=Path("ckpt"))
    with pytest.raises(UsageError, match=r"cannot resume ckpt: tokenizer\.json \(as this run builds it\) changed"):
        check_changes([], allowed=False, path=Path("ckpt"), files=["tokenizer.json"])


def test_a_count_or_width_given_as_what_its_0_stands_for_is_no_change():
    saved = {"model.n_head": 4, "model.n_embd": 128, "model.n_kv_head": 0, "model.head_size": 0}
    same = {**saved, "model.n_kv_head": 4, "model.head_size": 32}  # 4 key-value heads, 128 / 4 wide: the defaults
    assert config_changes(saved, same) == [] and config_changes(same, saved) == []
    assert config_changes(saved, {**saved, "model.n_kv_head": 2, "model.head_size": 64}) == \
        ["model.head_size", "model.n_kv_head"]
    # twice the heads: that is the change, however the other two are given
    assert config_changes(saved, {**same, "model.n_head": 8}) == ["model.n_head"]
    assert config_changes(saved, {**saved, "model.n_head": 8}) == ["model.n_head"]


def test_a_file_that_differs_is_named_unless_a_changed_setting_explains_it():
    from llm.training.core.resume import unexplained

    files = ["corpus.json", "tokenizer.json", "model_config.json"]
    assert unexplained(files, ["data.path"]) == ["model_config.json"]
    assert unexplained(files, ["data.vocab_size"]) == ["corpus.json"]  # the tokenizer's, and the embedding's size
    assert unexplained(files, ["data.val_fraction"]) == files  # the split moves, not the corpus's text
    assert unexplained(files, ["training.batch_size", "world_size"]) == files
    assert unexplained(files, ["model.n_head"]) == ["corpus.json", "tokenizer.json"]
    assert unexplained(files, ["task"]) == [] and unexplained(["notes.txt"], ["data.path"]) == ["notes.txt"]


def test_a_changed_schedule_takes_this_runs_rates_at_the_resumed_step():
    def optimizer_and_schedule(t_max):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, weight_decay=0.0)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)

    uninterrupted, schedule = optimizer_and_schedule(20)
    for _ in range(7):
        uninterrupted.step()
        schedule.step()
    # a run saved at step 7 with T_max=10 and weight decay 0.5, resumed with T_max=20 and no decay
    saved, old = optimizer_and_schedule(10)
    saved.param_groups[0]["weight_decay"] = 0.5
    for _ in range(7):
        saved.step()
        old.step()
    resumed, new = optimizer_and_schedule(20)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in resumed.param_groups]
    resumed.load_state_dict(saved.state_dict())  # brings back the saved rate and weight decay
    keep_optimizer_settings(resumed, fresh, new, step=7)
    assert resumed.param_groups[0]["lr"] == pytest.approx(uninterrupted.param_groups[0]["lr"], rel=1e-12)
    assert resumed.param_groups[0]["weight_decay"] == 0.0
    assert new.state_dict() == schedule.state_dict()  # its count of calls too: the next checkpoint's is the same
    # a LambdaLR jumps to the step, which counted one call where an uninterrupted run counts one a step
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    jumped = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    keep_optimizer_settings(optimizer, [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
                            jumped, step=7)
    stepped = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1),
                                                lambda step: 1 / (1 + step))
    for _ in range(7):
        stepped.optimizer.step()
        stepped.step()
    assert jumped.last_epoch == stepped.last_epoch and jumped._step_count == stepped._step_count


def test_a_setting_newer_than_the_checkpoint_counts_as_saved_at_its_default():
    from llm.training.core.callbacks import flatten
    from llm.training.core.config import Config
    from llm.training.core.resume import config_changes, with_defaults

    now = flatten(Config().to_dict())
    saved = {k: v for k, v in now.items() if k != "training.tf32"}  # a checkpoint from before the setting
    assert config_changes(with_defaults(saved, Config()), now) == []
    assert config_changes(with_defaults(saved, Config()), {**now, "training.tf32": True}) == ["training.tf32"]
    from llm.training.core.resume import change  # and shown so: not as None

    assert change("training.tf32", with_defaults(saved, Config()), {**now, "training.tf32": True}) == \
        "training.tf32 (False -> True)"


def test_a_class_of_a_script_run_as_main_that_is_not_running_is_named_in_one_line():
    with pytest.raises(UsageError, match=r"task '__main__:SineTask' is a class of a script run as __main__ .*"
                                         r"name it by its module, module:SineTask"):
        resolve_task("__main__:SineTask")


def test_a_go_back_command_run_again_goes_back_once_more_only_for_another_course():
    changed = ["training.max_steps", "training.device", "logging.log_every_steps", "checkpoint.keep_last",
               "data.num_workers", "optimizer.lr", "model.n_layer", "training.grad_clip"]
    assert course_changes(changed) == ["optimizer.lr", "model.n_layer", "training.grad_clip"]


def test_a_data_file_named_otherwise_is_no_change_and_a_refusal_shows_the_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("text")
    (tmp_path / "link.txt").symlink_to(tmp_path / "corpus.txt")
    saved = {"data.path": "corpus.txt", "data.tokenizer": "char", "world_size": 1}
    for same in ("./corpus.txt", str(tmp_path / "corpus.txt"), "link.txt", "sub/../corpus.txt"):
        assert config_changes(saved, {**saved, "data.path": same}) == [], same
    moved = {**saved, "data.path": "other.txt"}
    assert config_changes(saved, moved) == ["data.path"]
    with pytest.raises(UsageError, match=r"^cannot resume ckpt: data.path \('corpus.txt' -> 'other.txt'\) changed"):
        check_changes(["data.path"], allowed=False, path=Path("ckpt"), saved=saved, now=moved)


def test_a_run_of_a_script_resumed_from_the_command_line_is_told_why_its_classes_count_as_changed():
    saved, now = {"task": "__main__:SineTask"}, {"task": "sine:SineTask"}
    assert change("task", saved, now) == (
        "task ('__main__:SineTask' -> 'sine:SineTask'; a class of the script that trained, run as __main__, which no "
        "other process can name: if this is the same class, resume anyway as said below, and import it into that "
        "script from now on)")
    assert change("task", {"task": "lm"}, now) == "task ('lm' -> 'sine:SineTask')"


def test_a_bpe_tokenizer_that_differs_is_put_down_to_another_version_only_when_both_hold_the_same_corpus(tmp_path):
    from types import SimpleNamespace

    from llm.training.core.resume import RETRAINED_OTHERWISE, changed_artifacts

    class Task:  # a language model's artifacts, as this run would write them
        config = SimpleNamespace(data=SimpleNamespace(tokenizer="bpe"))

        def __init__(self, corpus):
            self.corpus = corpus

        def save_artifacts(self, directory):
            (directory / "tokenizer.json").write_text('{"merges": ["a b"]}')
            if self.corpus:
                (directory / "corpus.json").write_text(json.dumps({"sha256": self.corpus}))

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "tokenizer.json").write_text('{"merges": ["b c"]}')
    assert changed_artifacts(Task("abc"), checkpoint) == ["tokenizer.json"]  # a checkpoint without corpus.json
    (checkpoint / "corpus.json").write_text(json.dumps({"sha256": "abc"}))
    assert changed_artifacts(Task("abc"), checkpoint) == [RETRAINED_OTHERWISE]
    assert changed_artifacts(Task("abd"), checkpoint) == ["corpus.json", "tokenizer.json"]  # an edited corpus


@pytest.mark.parametrize("data", ["UnskippableData", "BucketedData"])
def test_a_loader_that_cannot_skip_is_replayed_and_the_resume_is_still_exact(tmp_path, data):
    settings = {"training": {"epochs": 2}, "checkpoint": {"every_n_steps": 3}, "model": {"dropout": 0.1},
                "data": {"module": f"tests.helpers:{data}"}}
    reference, _ = train(tiny_config(tmp_path / "ref", **settings))
    with pytest.raises(CallbackError, match="simulated crash"):
        train(tiny_config(tmp_path / "crash", **settings), callbacks=[CrashAt(10)])  # saved at 9, mid-epoch
    resumed_config = tiny_config(tmp_path / "crash", **{**settings, "checkpoint": {"resume": "auto"}})
    with pytest.warns(UserWarning, match="replaying batches to resume mid-epoch"):
        resumed, _ = train(resumed_config)
    assert resumed.step == reference.step
    for (name, w_ref), w in zip(weights(reference.raw_model).items(), weights(resumed.raw_model).values()):
        assert torch.equal(w_ref, w), name


def test_a_run_stopped_after_an_epochs_last_validation_resumes_without_validating_it_again(tmp_path):
    class TermAt(Callback):
        def on_step_end(self, engine):
            if engine.step == 14:  # the epoch's last step, validated and saved before the stop
                os.kill(os.getpid(), signal.SIGTERM)

    settings = {"training": {"epochs": 2, "eval_every_steps": 7, "patience": 1}, "checkpoint": {"every_n_steps": 7},
                "model": {"dropout": 0.1}}
    ref = tiny_config(tmp_path / "ref", **settings)
    reference, _ = train(ref, callbacks=default_callbacks(ref))
    stopped = tiny_config(tmp_path / "stop", **settings)
    with pytest.raises(TrainingInterrupted):
        train(stopped, callbacks=[TermAt(), *default_callbacks(stopped)])
    resumed_config = tiny_config(tmp_path / "stop", **{**settings, "checkpoint": {"resume": "auto"}})
    resumed, _ = train(resumed_config, callbacks=default_callbacks(resumed_config))
    for (name, w_ref), w in zip(weights(reference.raw_model).items(), weights(resumed.raw_model).values()):
        assert torch.equal(w_ref, w), name

    def records(run):
        return [json.loads(line) for line in (tmp_path / run / "run/metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in records("stop") if r["split"] == "val"] == [7, 14, 21, 28]
    epochs = [r for r in records("stop") if r["split"] == "epoch"]
    assert [r["train_loss"] for r in epochs] == pytest.approx(
        [r["train_loss"] for r in records("ref") if r["split"] == "epoch"], rel=1e-6)  # not nan after the resume


def test_a_validation_logged_again_after_a_resume_keeps_one_record(tmp_path):
    # stopped by a signal on its last step, before its final validation; the run that validates it dies
    # before its save: the run after that validates step 6 again, and step 6 keeps one validation record
    class TermAt6(Callback):
        def on_step_end(self, engine):
            if engine.step == 6:
                os.kill(os.getpid(), signal.SIGTERM)

    class DieAfterValidationLog(Callback):
        def on_log(self, engine, record):
            if record["split"] == "val":
                raise RuntimeError("killed before the save")

    config = tiny_config(tmp_path, training={"max_steps": 6, "eval_every_steps": 4}, checkpoint={"resume": "auto"})
    with pytest.raises(TrainingInterrupted):
        train(config, callbacks=[TermAt6(), *default_callbacks(config)])
    with pytest.raises(CallbackError, match="killed before the save"):
        train(config, callbacks=[*default_callbacks(config), DieAfterValidationLog()])
    _, metrics = train(config, callbacks=default_callbacks(config))
    assert [r["step"] for r in records_of(tmp_path / "run", "val")] == [4, 6]
    # the resumes start at max_steps and take no step, yet end for the reason the run ends
    assert metrics["stop_reason"] == "reached max_steps=6"
    assert json.loads((tmp_path / "run/summary.json").read_text())["stop_reason"] == "reached max_steps=6"
    dropped = (tmp_path / "run/metrics.dropped.jsonl").read_text().splitlines()
    assert [(r["split"], r["step"]) for r in map(json.loads, dropped)] == [("val", 6)]


def test_resume_restores_callback_state(tmp_path):
    config = tiny_config(tmp_path, training={"epochs": 2})
    first, _ = train(config, callbacks=default_callbacks(config))
    resumed = tiny_config(tmp_path, training={"epochs": 3}, checkpoint={"resume": "auto"})
    callbacks = default_callbacks(resumed)
    engine = TrainingEngine(resumed, RegressionTask(resumed), 0, 1, callbacks=callbacks)
    engine.setup()
    early = next(cb for cb in callbacks if type(cb).__name__ == "EarlyStopping")
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert early.best == min(r["val_loss"] for r in records if r["split"] == "val")
    assert engine.step == first.step and engine.epoch == 2


def test_a_run_extended_past_its_max_steps_trains_as_one_that_never_stopped(tmp_path):
    # max_steps=9 falls between evaluations (every 4 steps): the run's final validation at step 9 is off the
    # schedule, and must not count towards early stopping when a higher max_steps continues the run
    settings = {"training": {"epochs": 2, "eval_every_steps": 4, "patience": 3}, "optimizer": {"scheduler": "constant"},
                "model": {"dropout": 0.1}}
    ref_config = tiny_config(tmp_path / "ref", **settings)
    reference, _ = train(ref_config, callbacks=default_callbacks(ref_config))
    short = tiny_config(tmp_path, **{**settings, "training": {**settings["training"], "max_steps": 9}})
    stopped, _ = train(short, callbacks=default_callbacks(short))
    assert stopped.step == 9 and stopped.val_metrics["step"] == 9
    saved = load_shared_state(tmp_path / "run/checkpoints/step_00000009")
    scheduled = [r["val_loss"] for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines())
                 if r["split"] == "val" and r["step"] in (4, 8)]
    assert saved["best_metric"] == min(scheduled) > stopped.best_metric  # step 9's validation: logged, not counted
    assert saved["progress"]["stop"] == ""  # nor a stop it would have asked for
    longer = tiny_config(tmp_path, checkpoint={"resume": "auto"}, **settings)
    callbacks = default_callbacks(longer)
    extended, _ = train(longer, callbacks=callbacks)
    assert extended.step == reference.step and extended.stop_reason == reference.stop_reason
    assert extended.best_metric == reference.best_metric
    early = [next(cb for cb in e.callbacks if isinstance(cb, EarlyStopping)) for e in (reference, extended)]
    assert early[0].state_dict() == early[1].state_dict()
    for (name, a), b in zip(weights(reference.raw_model).items(), weights(extended.raw_model).values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("training", [{"epochs": 1}, {"max_steps": 9, "eval_every_steps": 4}])
def test_a_finished_run_started_again_changes_nothing(tmp_path, training):
    # max_steps 9: the run ends with a log window still open and a validation off the schedule
    config = tiny_config(tmp_path, training=training, checkpoint={"resume": "auto"})
    first, metrics = train(config, callbacks=default_callbacks(config))
    checkpoint = tmp_path / "run/checkpoints" / f"step_{first.step:08d}"
    written = {p: p.stat().st_mtime_ns for p in checkpoint.rglob("*")}
    logged, summary = ((tmp_path / "run" / name).read_text() for name in ("metrics.jsonl", "summary.json"))
    again, repeated = train(config, callbacks=default_callbacks(config))
    assert again.step == first.step and {p: p.stat().st_mtime_ns for p in checkpoint.rglob("*")} == written
    assert (tmp_path / "run/metrics.jsonl").read_text() == logged  # no record logged twice
    assert (tmp_path / "run/summary.json").read_text() == summary  # the run's speed and stop reason, kept
    for key in ("train_loss", "val_loss", "best_val_loss"):
        assert repeated[key] == metrics[key], key
    assert repeated["samples_per_s"] is None  # this process took no step
    (tmp_path / "run/summary.json").unlink()  # lost to a full disk after the last save
    train(config, callbacks=default_callbacks(config))
    assert json.loads((tmp_path / "run/summary.json").read_text())["steps"] == first.step


def test_a_checkpoint_of_another_version_is_refused_in_one_line(tmp_path, monkeypatch):
    import llm.training.core.engine as engine_module

    train(tiny_config(tmp_path, training={"epochs": 1}))
    # as if this version wrote a key the checkpoint's did not
    monkeypatch.setattr(engine_module, "SHARED_STATE", (*engine_module.SHARED_STATE, "later_key"))
    with pytest.raises(UsageError, match=r"step_00000014 lacks later_key: it was written by another version of llm"):
        train(tiny_config(tmp_path, training={"epochs": 2}, checkpoint={"resume": "auto"}))


def test_fresh_run_refuses_to_overwrite_an_earlier_run(tmp_path):
    config = tiny_config(tmp_path, training={"epochs": 1})
    train(config)
    before = (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(UsageError, match="already holds a run.*--checkpoint-resume auto"):
        train(config)
    assert (tmp_path / "run" / "summary.json").read_text() == before


def test_resume_with_a_changed_model_is_refused_unless_allowed(tmp_path, capsys):
    train(tiny_config(tmp_path, training={"epochs": 1}))
    changed = tiny_config(tmp_path, model={"n_embd": 32}, checkpoint={"resume": "auto"})
    with pytest.raises(UsageError, match=r"model.n_embd \(\d+ -> \d+\) changed.*--checkpoint-allow-config-change"):
        train(changed)
    assert "resuming" not in capsys.readouterr().out  # refused: it does not first say it resumes


def test_resume_with_harmless_changes_goes_through(tmp_path, capsys):
    first, _ = train(tiny_config(tmp_path, training={"epochs": 1}))
    more = tiny_config(tmp_path, training={"epochs": 2}, optimizer={"lr": 0.01}, checkpoint={"resume": "auto"},
                       data={"cache_dir": str(tmp_path / "elsewhere"), "num_workers": 1})
    engine, _ = train(more)
    assert engine.step == 2 * first.step
    out = capsys.readouterr().out
    assert "training.epochs (1 -> 2)" in out and "optimizer.lr (0.02 -> 0.01)" in out
    assert "data.num_workers (0 -> 1; what a data set draws at random" in out and "data.cache_dir" in out


def test_a_checkpoint_of_another_run_branches_into_a_new_folder_never_into_a_third_runs(tmp_path, capsys):
    first, _ = train(tiny_config(tmp_path / "a", training={"max_steps": 6}, checkpoint={"every_n_steps": 3}))
    other, _ = train(tiny_config(tmp_path / "b", training={"max_steps": 2}))
    before = {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    step_3 = str(tmp_path / "a/run/checkpoints/step_00000003")
    with pytest.raises(UsageError, match=r"b/run already holds a run and .*step_00000003 is not one of its checkpoints"):
        train(tiny_config(tmp_path / "b", training={"max_steps": 6}, checkpoint={"resume": step_3}))
    assert {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()} == before
    branch_config = tiny_config(tmp_path / "c", training={"max_steps": 6}, checkpoint={"resume": step_3})
    with pytest.raises(CallbackError, match="simulated crash"):  # before the branch saves a checkpoint of its own
        train(branch_config, callbacks=[CrashAt(4)])
    branch, _ = train(branch_config)  # the same command again: the branch starts over from step 3
    assert branch.step == 6 and (tmp_path / "c/run/checkpoints/latest").read_text().strip() == "step_00000006"
    for (name, w_first), w_branch in zip(weights(first.raw_model).items(), weights(branch.raw_model).values()):
        assert torch.equal(w_first, w_branch), name  # the branch retrains steps 4-6 exactly
    capsys.readouterr()
    again, _ = train(tiny_config(tmp_path / "c", training={"max_steps": 8}, checkpoint={"resume": step_3}))
    assert again.step == 8 and "c/run/checkpoints/step_00000006 at step 6" in capsys.readouterr().out


def test_another_runs_checkpoint_folder_is_refused_from_any_folder_and_a_copy_is_taken_when_said(tmp_path,
                                                                                                  monkeypatch):
    def config(log_dir, checkpoint_dir="", **checkpoint):
        return tiny_config(tmp_path, training={"epochs": 1}, logging={"log_dir": log_dir},
                           checkpoint={"dir": checkpoint_dir, **checkpoint})

    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        train(config(f"runs/{name}"))
    train(config("ck/c_logs", "ck/c"))  # checkpoints outside the run folder
    monkeypatch.chdir(tmp_path / "sub")  # the runs' relative paths now point elsewhere
    before = (tmp_path / "runs/a/summary.json").read_bytes()
    with pytest.raises(UsageError, match=r"checkpoint.dir ../runs/b/checkpoints holds the checkpoints of the run in "
                                         r"\S*runs/b, not of ../runs/a"):
        train(config("../runs/a", "../runs/b/checkpoints", resume="auto"))
    with pytest.raises(UsageError, match=r"holds the checkpoints of the run in \S*ck/c_logs, not of ../runs/d"):
        train(config("../runs/d", "../ck/c", resume="auto"))
    assert (tmp_path / "runs/a/summary.json").read_bytes() == before and not (tmp_path / "runs/d").exists()
    shutil.copytree(tmp_path / "ck/c", tmp_path / "ck/d")  # a copy of the run, checkpoints and logs
    shutil.copytree(tmp_path / "ck/c_logs", tmp_path / "ck/d_logs")
    copy, _ = train(tiny_config(tmp_path, training={"epochs": 2}, logging={"log_dir": "../ck/d_logs"},
                                checkpoint={"dir": "../ck/d", "resume": "auto", "allow_config_change": True}))
    assert copy.step == 2 * 14 and (tmp_path / "ck/d/latest").read_text().strip() == "step_00000028"
    # a run whose logs lie inside its own checkpoint folder: retention deletes only step_* folders there
    train(config("../own/logs", "../own"))
    again, _ = train(tiny_config(tmp_path, training={"epochs": 2}, logging={"log_dir": "../own/logs"},
                                 checkpoint={"dir": "../own", "resume": "auto"}))
    assert again.step == 2 * 14


class RatesAtStart(Callback):
    """The optimizer's settings and state once setup (and any resume) is done."""

    def on_train_start(self, engine):
        self.lrs = [g["lr"] for g in engine.optimizer.param_groups]
        self.decays = [g["weight_decay"] for g in engine.optimizer.param_groups]
        # what the state holds, not its entries: SGD makes its momentum buffers as zeros before any step
        self.moments = sum(bool(v.any()) for state in engine.optimizer.state.values() for v in state.values()
                           if torch.is_tensor(v))


def test_a_resume_with_a_new_learning_rate_and_weight_decay_uses_them_where_the_schedule_stands(tmp_path):
    train(tiny_config(tmp_path, training={"max_steps": 10}))  # cosine over 10 steps: lr 0 at the end
    config = tiny_config(tmp_path, optimizer={"lr": 0.005, "weight_decay": 0.1}, checkpoint={"resume": "auto"})
    start = RatesAtStart()
    engine, _ = train(config, callbacks=[start])
    assert engine.total_steps == 28 and start.moments > 0  # the saved moments are loaded
    expected = 0.005 * lr_factor(10, config.optimizer, 28)  # step 10 of the new 28-step schedule
    assert start.lrs == pytest.approx([expected, expected], rel=1e-12) and start.decays == [0.1, 0.0]


def test_a_run_gone_back_to_an_earlier_checkpoint_of_its_own_sets_the_later_ones_aside_and_resumes_its_own(
        tmp_path, capsys):
    """Back to step 4 of a run that saved 4, 8 and 12, with a lower rate. Left in place, the later checkpoints
    were taken for the newest of the new continuation (the same command again after a crash went on from the
    old step 12) and pushed its own out at retention."""
    every_4 = {"checkpoint": {"every_n_steps": 4}}
    for run in ("ref", "crash"):
        train(tiny_config(tmp_path / run, training={"max_steps": 12}, **every_4))
    back = lambda run: tiny_config(tmp_path / run, training={"max_steps": 12}, optimizer={"lr": 0.01},  # noqa: E731
                                   checkpoint={"every_n_steps": 4,
                                               "resume": str(tmp_path / run / "run/checkpoints/step_00000004")})
    reference, _ = train(back("ref"))
    with pytest.raises(CallbackError, match="simulated crash"):
        train(back("crash"), callbacks=[CrashAt(9)])  # after its own step 8 is saved
    checkpoints = tmp_path / "crash/run/checkpoints"
    assert "2 checkpoint(s) of steps after 4, where this run goes on from, moved to " \
           f"{checkpoints / 'dropped'}" in capsys.readouterr().out
    assert sorted(p.name for p in (checkpoints / "dropped").iterdir()) == ["step_00000008", "step_00000012"]
    assert (checkpoints / "latest").read_text() == "step_00000008\n"
    # the same command again, on from the new continuation's step 8, not from step 4 once more; how it logs and
    # saves, its data workers and its length may change on the way
    again = back("crash")
    again.logging.log_every_steps, again.checkpoint.keep_last, again.data.num_workers = 3, 5, 1
    resumed, _ = train(again)
    assert resumed._loaded == checkpoints / "step_00000008" and resumed.step == 12
    for (name, w_ref), w in zip(weights(reference.raw_model).items(), weights(resumed.raw_model).values()):
        assert torch.equal(w_ref, w), name
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000004", "step_00000008", "step_00000012"]
    assert sorted(p.name for p in (checkpoints / "dropped").iterdir()) == ["step_00000008", "step_00000012"]
    # a checkpoint set aside is continued by a branch of its own, not in this run
    aside = tiny_config(tmp_path / "crash", checkpoint={"resume": str(checkpoints / "dropped/step_00000012")})
    with pytest.raises(UsageError, match=r"dropped/step_00000012 was set aside when this run went back to an "
                                         r"earlier step: branch from it into a new --logging-log-dir DIR"):
        train(aside)
    # back to step 4 once more, with another rate: not the same command again, which would go on from step 12
    lower = back("crash")
    lower.optimizer.lr = 0.005
    again, _ = train(lower)
    assert again._loaded == checkpoints / "step_00000004" and again.step == 12
    assert sorted(p.name for p in (checkpoints / "dropped").iterdir()) == [
        "step_00000008", "step_00000008.2", "step_00000012", "step_00000012.2"]


def test_a_torchrun_restart_before_the_go_back_was_made_goes_back_as_told(tmp_path, monkeypatch):
    """A launch told to go back to step 4 that failed in set-up (a rank's data, say) and was restarted: it has
    written nothing, so its restart goes back to step 4 too, not on from the run's newest checkpoint."""
    train(tiny_config(tmp_path, training={"max_steps": 12}, checkpoint={"every_n_steps": 4}))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    back = tiny_config(tmp_path, training={"max_steps": 12}, optimizer={"lr": 0.01},
                       checkpoint={"every_n_steps": 4, "resume": str(tmp_path / "run/checkpoints/step_00000004")})
    engine, _ = train(back)
    assert engine._loaded == tmp_path / "run/checkpoints/step_00000004"
    assert sorted(p.name for p in (tmp_path / "run/checkpoints/dropped").iterdir()) == ["step_00000008",
                                                                                          "step_00000012"]


def test_a_resume_with_another_optimizer_is_refused_unless_allowed_then_starts_it_afresh(tmp_path):
    train(tiny_config(tmp_path, training={"max_steps": 10}, optimizer={"scheduler": "linear"}))
    sgd = {"name": "sgd", "scheduler": "linear"}
    with pytest.raises(UsageError, match=r"optimizer.name \('adamw' -> 'sgd'\) changed.*--checkpoint-allow-config-change"):
        train(tiny_config(tmp_path, training={"max_steps": 20}, optimizer=sgd, checkpoint={"resume": "auto"}))
    config = tiny_config(tmp_path, training={"max_steps": 20}, optimizer=sgd,
                         checkpoint={"resume": "auto", "allow_config_change": True})
    start = RatesAtStart()
    engine, _ = train(config, callbacks=[start])
    assert isinstance(engine.optimizer, torch.optim.SGD) and start.moments == 0 and engine.step == 20
    assert start.lrs == pytest.approx([0.02 * lr_factor(10, config.optimizer, 20)] * 2, rel=1e-12)


def test_a_run_resumed_in_another_layout_then_again_in_its_own_is_exact_and_keeps_its_new_rate(tmp_path):
    # 4 steps of 16, then batches of 32 and a new lr: a schedule of 4 + 5 + 7 = 16 steps, not the 14 that
    # 2 epochs of 32 would make from step 0. That run crashes, and resumes with its own config, unchanged.
    new = {"training": {"epochs": 2, "batch_size": 32}, "optimizer": {"lr": 0.05, "warmup_steps": 6},
           "checkpoint": {"resume": "auto", "allow_config_change": True, "every_n_steps": 3}}
    for run in ("ref", "crash"):
        train(tiny_config(tmp_path / run, training={"epochs": 2, "max_steps": 4}))
    rates = LearningRates()
    reference, _ = train(tiny_config(tmp_path / "ref", **new), callbacks=[rates])
    config = tiny_config(tmp_path / "crash", **new)
    with pytest.raises(CallbackError, match="simulated crash"):
        train(config, callbacks=[CrashAt(11)])
    resumed, _ = train(config)  # from step 9
    assert reference.total_steps == resumed.total_steps == resumed.step == 16
    assert rates.after_step[5] == pytest.approx(0.05 * lr_factor(5, config.optimizer, 16), rel=1e-12)
    assert rates.after_step[16] == pytest.approx(0.0, abs=1e-12)
    for (name, w_ref), w in zip(weights(reference.raw_model).items(), weights(resumed.raw_model).values()):
        assert torch.equal(w_ref, w), name


def test_restarted_torchrun_worker_resumes_automatically(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, training={"epochs": 2}, checkpoint={"every_n_steps": 5})
    with pytest.raises(CallbackError):
        train(config, callbacks=[CrashAt(12)])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    engine = TrainingEngine(config, RegressionTask(config), 0, 1)
    engine.setup()
    assert engine.step == 10


def test_a_tasks_own_settings_are_recorded_and_a_resume_that_changes_one_is_refused_unless_allowed(tmp_path, capsys):
    from tests.helpers import ScaledLossTask

    def scaled(scale, **checkpoint):
        return tiny_config(tmp_path, task="tests.helpers:ScaledLossTask", custom={"scale": scale},
                           training={"epochs": 1}, checkpoint=checkpoint)

    engine, _ = train(scaled(2.0), ScaledLossTask)
    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["custom"] == \
        {"scale": 2.0, "reduce": "mean", "steps": 0}
    with pytest.raises(UsageError, match=r"cannot resume .*step_00000014: custom\.scale \(2\.0 -> 1\.0\) changed"):
        train(scaled(1.0, resume="auto"), ScaledLossTask)
    capsys.readouterr()
    resumed, _ = train(scaled(1.0, resume="auto", allow_config_change=True), ScaledLossTask)
    assert "resuming with a changed config: custom.scale (2.0 -> 1.0)" in capsys.readouterr().out
    assert resumed.step == 14 and resumed.config.custom.scale == 1.0


def test_a_checkpoint_from_before_the_task_had_settings_resumes_as_if_saved_at_their_defaults(tmp_path):
    from tests.helpers import ScaledLossTask

    config = tiny_config(tmp_path, task="tests.helpers:ScaledLossTask")
    now = flatten(dataclasses.asdict(config))
    saved = {k: v for k, v in now.items() if not k.startswith("custom.")}  # a checkpoint from before its settings
    assert now["custom.scale"] == 1.0 and resume.config_changes(saved, now) == ["custom.reduce", "custom.scale",
                                                                                 "custom.steps"]
    assert resume.with_defaults(saved, config)["custom.scale"] == 1.0
    assert resume.config_changes(resume.with_defaults(saved, config), now) == []
    changed = resume.config_changes(resume.with_defaults(saved, config), {**now, "custom.scale": 3.0})
    assert changed == ["custom.scale"] and resume.binding_changes(changed) == ["custom.scale"]
    assert ScaledLossTask(config).config.custom.scale == 1.0
