"""The methods that ship with the package: importing this module imports every module of the method folders
(token_ops/, heads/) that defines a method, i.e. has a line starting with `@register_method`; its class registers
itself there (registry.register_method). vlm_efficient's __init__ imports this module after the core. A new method is
its file alone. The folders' other modules are helpers, imported by the methods that use them, or commands
(heads/inspect.py, heads/tag.py) that sit above the core and are never imported here (tests/test_layering.py)."""

import importlib
import pkgutil
import re
from pathlib import Path

_DEFINES_A_METHOD = re.compile(r"^@register_method\b", re.MULTILINE)


def method_modules(package) -> list[str]:
    """Names of the modules in `package`'s folder that define a method, sorted."""
    return sorted(info.name for info in pkgutil.iter_modules(package.__path__)
                  if _DEFINES_A_METHOD.search((Path(info.module_finder.path) / f"{info.name}.py").read_text()))


for _folder in ("token_ops", "heads"):
    _package = importlib.import_module(f"{__package__}.{_folder}")  # namespace folders: no `from . import` edge
    for _name in method_modules(_package):
        importlib.import_module(f"{_package.__name__}.{_name}")
