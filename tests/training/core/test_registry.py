import sys
import types

from llm.data.synthetic_data_module import SyntheticDataModule
from llm.training.core import registry
from llm.training.core.registry import data_module_name


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
