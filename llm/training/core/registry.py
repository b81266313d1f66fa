"""Built-in task and data-module names, and loading a user's ``package.module:Class``."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm.errors import UsageError, closest, one_line

TASKS = {
    "regression": "llm.training.tasks.regression_task:RegressionTask",
    "classification": "llm.training.tasks.classification_task:ClassificationTask",
    "lm": "llm.training.tasks.lm_task:LMTask",
}

DATA_MODULES = {
    "synthetic": "llm.data.synthetic_data_module:SyntheticDataModule",
    "classification": "llm.data.classification_data_module:ClassificationDataModule",
    "text": "llm.data.text_data_module:TextDataModule",
}


def resolve_task(name: str) -> type:
    from llm.training.tasks.base_task import TrainingTask

    return _resolve(name, TASKS, TrainingTask, "task")


def resolve_data_module(name: str) -> type:
    from llm.data.data_module import BaseDataModule

    return _resolve(name, DATA_MODULES, BaseDataModule, "data module")


def resolve_callback(name: str) -> type:
    """A callback class of the user's, ``package.module:Class``: the command line has no built-in names for them."""
    from llm.training.core.callbacks import Callback

    return _resolve(name, {}, Callback, "callback")


def data_module_of(config: Any, task: Any) -> str:
    """The data module ``task`` trains on: ``data.module``, else the task's ``default_data_module``."""
    named = config.data.module or task.default_data_module
    if not isinstance(named, str) or not named:
        raise UsageError(f"{type(task).__name__}.default_data_module: got {named!r}, expected a built-in name "
                         f"({', '.join(DATA_MODULES)}) or package.module:Class; or give --data-module (in code, "
                         f"the engine's data_module=)")
    return named


def task_name(cls: type, named: str) -> str:
    """What ``config.task`` should say for a task of class ``cls`` that came with the config's name ``named``."""
    return _name(cls, named, TASKS, resolve_task)


def data_module_name(cls: type, named: str) -> str:
    """Likewise for ``config.data.module``, where ``named`` is the data module the config resolves to."""
    return _name(cls, named, DATA_MODULES, resolve_data_module)


def _name(cls: type, named: str, builtins: dict[str, str], resolve: Callable[[str], type]) -> str:
    """``named`` if it resolves to ``cls``, else its built-in name or ``package.module:Class``: what a run
    records in config.yaml, so that a resume and the tools rebuild the class that trained, not the one named.

    A class of a script run as __main__ (python sine.py, which trains) cannot be imported by that name: the
    ``named`` class of the same name in the same file stands for it, as sine:SineTask for __main__:SineTask.
    """
    try:
        resolved = resolve(named)
        if resolved is cls or (cls.__module__ == "__main__" and resolved.__qualname__ == cls.__qualname__
                               and _same_file(sys.modules[resolved.__module__], sys.modules["__main__"])):
            return named
    except UsageError:  # a name set in code that names nothing: the class at hand is what ran
        pass
    path = f"{cls.__module__}:{cls.__qualname__}"
    return next((name for name, where in builtins.items() if where == path), path)


def _same_file(a: Any, b: Any) -> bool:
    """Whether two modules were loaded from one file (a script run as __main__, imported by its name too)."""
    files = [getattr(m, "__file__", None) for m in (a, b)]
    try:
        return all(files) and os.path.samefile(*files)
    except OSError:
        return False


def _resolve(name: str, builtins: dict[str, str], base: type, kind: str) -> type:
    """A built-in name or ``package.module:Class``; imports only what the user named."""
    if ":" not in name:
        if name not in builtins:
            choices = f"one of {', '.join(builtins)} or " if builtins else ""
            raise UsageError(f"unknown {kind} {name!r}{closest(name, builtins)}: use {choices}package.module:Class")
        name = builtins[name]
    module_name, _, class_name = name.partition(":")
    if not module_name or not class_name or module_name.startswith("."):
        raise UsageError(f"{kind} {name!r}: expected a built-in name or package.module:Class")
    if module_name == "__main__" and not hasattr(sys.modules["__main__"], class_name.partition(".")[0]):
        raise UsageError(f"{kind} {name!r} is a class of a script run as __main__ (python script.py, which trained "
                         f"from code), and cannot be found from here: name it by its module, module:{class_name}")
    whose = kind if kind.endswith(" module") else f"{kind} module"  # a data module's: not "data module module"
    if module_name.endswith(".py") or "/" in module_name:  # a file's name or path, where a module's is asked for
        raise UsageError(f"{kind} {name!r}: {module_name!r} is a file's name, expected a module's: "
                         f"{Path(module_name).stem}:{class_name}, from the folder that holds it (python -m searches "
                         f"it; else PYTHONPATH=.)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"cannot import {whose} {module_name!r}: {e}{_not_searched(e)}") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module failed as it ran: say where, in one line
        raise UsageError(f"cannot import {whose} {module_name!r}: {_where(e)}") from None
    cls = module
    for part in class_name.split("."):  # a class nested in another (Outer.Task), as its __qualname__ names it
        cls = getattr(cls, part, None)
    if cls is None:
        raise UsageError(f"module {module_name!r} has no {class_name!r} for the {kind}")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise UsageError(f"{name} is not a {base.__name__} subclass, so it cannot be used as the {kind}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise UsageError(f"{name} cannot be used as the {kind}: it does not implement {missing}")
    return cls


def _not_searched(error: ImportError) -> str:
    """Where a module not found lies in the working directory, which the import path lacks (llm-train, torchrun
    path/to/train.py): how to have it searched."""
    top = (getattr(error, "name", None) or "").partition(".")[0]
    here = Path.cwd()
    searched = any(Path(entry or ".").resolve() == here for entry in sys.path)
    # a package, with an __init__.py or without (a namespace package), holds Python files; a data folder does not
    if not top or searched or not ((here / f"{top}.py").is_file() or any((here / top).glob("*.py"))):
        return ""
    return ("; it is in the working directory, which this command does not search: run it with PYTHONPATH=. "
            "(python -m and torchrun -m search it)")


def _where(error: Exception) -> str:
    """``Type: message`` of an exception, and the file and line it came from (a SyntaxError names its own)."""
    text = one_line(error, 1000)
    if isinstance(error, SyntaxError):
        return f"{type(error).__name__}: {text}"
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (raised at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {text}{where}"
