"""Import a bench/ script (not a package) as a module for its smoke test (the sys.modules entry matters:
dataclasses look their module up there, and the scripts import each other by name)."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_bench(name: str):
    """bench/<name>.py as module `name` (registered in sys.modules: the scripts import each other by name)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
