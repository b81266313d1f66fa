import sys
import types
from pathlib import Path

import pytest

from llm.data.synthetic_data_module import SyntheticDataModule
from llm.errors import UsageError
from llm.training.core import registry
from llm.training.core.registry import data_module_name, resolve_task


def a_class_of_main(name: str) -> type:
    """A data module class as a script run as __main__ defines it."""
    return type(name, (SyntheticDataModule,), {"__module__": "__main__"})


def test_a_class_of_a_script_is_recorded_by_the_name_given_only_when_that_names_it_in_the_same_file(monkeypatch):
    # a script's own class that shares a built-in's name is another class: recorded as the script's
    mine = a_class_of_main("SyntheticDataModule")
    assert data_module_name(mine, "synthetic") == "__main__:SyntheticDataModule"
    # the script is the module the name imports (python synthetic_data_module.py, which trains): that name
    script = types.ModuleType("__main__")
    script.__file__ = sys.modules[SyntheticDataModule.__module__].__file__
    monkeypatch.setitem(sys.modules, "__main__", script)
    assert data_module_name(mine, "synthetic") == "synthetic"
    assert data_module_name(a_class_of_main("OtherData"), "synthetic") == "__main__:OtherData"
    assert registry._same_file(script, sys.modules[SyntheticDataModule.__module__])


def test_a_module_in_the_working_directory_the_import_path_lacks_is_named_with_the_way_to_search_it(tmp_path,
                                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)  # as llm-train and torchrun path/to/train.py run: sys.path lacks the working folder
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and Path(p).resolve() != tmp_path])
    (tmp_path / "mine.py").write_text("from llm.training.tasks.regression_task import RegressionTask as Mine\n")
    with pytest.raises(UsageError, match=r"^cannot import task module 'mine': No module named 'mine'; it is in the "
                                         r"working directory, which this command does not search: run it with "
                                         r"PYTHONPATH=\. \(python -m and torchrun -m search it\)$"):
        resolve_task("mine:Mine")
    (tmp_path / "shards").mkdir()  # a folder of data named like a missing module is no module
    for missing in ("elsewhere", "shards"):  # nothing here to add
        with pytest.raises(UsageError, match=rf"^cannot import task module '{missing}': No module named '{missing}'$"):
            resolve_task(f"{missing}:Mine")
    (tmp_path / "tasks_of_mine").mkdir()  # a package without __init__.py (a namespace package) is a package
    (tmp_path / "tasks_of_mine" / "sine.py").write_text("")
    with pytest.raises(UsageError, match=r"^cannot import task module 'tasks_of_mine.sine': No module named "
                                         r"'tasks_of_mine'; it is in the working directory"):
        resolve_task("tasks_of_mine.sine:Sine")
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])
    assert resolve_task("mine:Mine").__name__ == "RegressionTask"


def test_a_class_nested_in_another_is_found_by_the_name_a_run_records_for_it(tmp_path, monkeypatch):
    (tmp_path / "nested_tasks.py").write_text(
        "from llm.training.tasks.regression_task import RegressionTask\n\n\n"
        "class Outer:\n    class Mine(RegressionTask):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from llm.training.core.registry import task_name

    task = resolve_task("nested_tasks:Outer.Mine")
    assert task.__qualname__ == "Outer.Mine"
    assert task_name(task, "regression") == "nested_tasks:Outer.Mine"  # what config.yaml records, read back
    with pytest.raises(UsageError, match=r"^module 'nested_tasks' has no 'Outer.Theirs' for the task$"):
        resolve_task("nested_tasks:Outer.Theirs")


@pytest.mark.parametrize("given", ["sine.py", "tasks/sine.py", "/abs/tasks/sine.py"])
def test_a_files_name_given_for_a_module_is_told_the_modules(given):
    with pytest.raises(UsageError, match=rf"^task '{given}:SineTask': '{given}' is a file's name, expected a "
                                         rf"module's: sine:SineTask, from the folder that holds it"):
        resolve_task(f"{given}:SineTask")


def test_a_module_that_exits_as_it_is_imported_is_named_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # raised at the sys.exit call, or in a hook of it that another library installed (wandb's, once it ran)
    with pytest.raises(UsageError, match=r"^cannot import task module 'exits_at_import': SystemExit: 5 \(raised at "
                                         r"[^\n]*\)$"):
        resolve_task("exits_at_import:Task")
