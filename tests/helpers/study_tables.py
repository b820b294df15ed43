"""Import a study's table.py under its own name: every study names its table command table.py."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_table(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
