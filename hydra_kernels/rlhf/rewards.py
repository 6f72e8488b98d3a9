"""Reward functions given by the user: `reward(prompts, completions, ended) -> floats`, loaded from a spec."""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable

__all__ = ["load_reward_fn"]


def load_reward_fn(spec: str, *, name: str = "spec") -> Callable:
    """The callable a spec names: `package.module:function` (imported from sys.path) or
    `path/to/file.py:function` (the file is loaded as a module of its own).

    name: how errors call the argument (the CLI and the recipes pass "--reward-fn").
    Raises ValueError (naming `name`) for a spec without ":", a missing file, a module that cannot be found, or
    an attribute that is missing or not callable. A module that is found but fails to import a dependency of
    its own raises that error unchanged (the user's code is broken, not the spec).
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{name}: expected module:function or file.py:function, got {spec!r}")
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        if not os.path.isfile(mod_name):
            raise ValueError(f"{name}: no such file {mod_name!r}")
        sp = importlib.util.spec_from_file_location("hydra_rlhf_user_reward", mod_name)
        if sp is None or sp.loader is None:
            raise ValueError(f"{name}: cannot load {mod_name!r}")
        module = importlib.util.module_from_spec(sp)
        sp.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name is None or not (mod_name == e.name or mod_name.startswith(e.name + ".")):
                raise                   # the user's module failed to import one of its own dependencies
            raise ValueError(f"{name}: cannot import module {mod_name!r} ({e}); for a file, give "
                             f"path/to/file.py:{fn_name}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{name}: {spec!r} is not a callable")
    return fn
