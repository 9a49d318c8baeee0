"""docs/api.md documents every name `probflow` exports, and every public function documents each
of its arguments under `**Arguments:**` (as diffrax's reference does)."""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import probflow as pf

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _exported() -> list[str]:
    init = Path(pf.__file__).read_text()
    names = re.findall(r"^from \S+ import (\w+) as \1$", init, flags=re.M)
    return [n for n in names if not isinstance(getattr(pf, n), types.ModuleType)]


def test_every_export_is_in_api_md():
    documented = set(re.findall(r"^::: probflow\.(\w+)$", API.read_text(), flags=re.M))
    exported = _exported()
    assert len(exported) > 80
    missing = sorted(set(exported) - documented)
    assert not missing, f"exported but not in docs/api.md: {missing}"
    unknown = sorted(documented - set(dir(pf)))
    assert not unknown, f"docs/api.md names what probflow does not export: {unknown}"


def test_public_functions_document_every_argument():
    problems = []
    for name in _exported():
        obj = getattr(pf, name)
        if not inspect.isfunction(obj):
            continue
        doc = inspect.getdoc(obj) or ""
        if "**Arguments:**" not in doc:
            problems.append(f"{name}: no **Arguments:** list")
            continue
        args = doc.split("**Arguments:**", 1)[1]
        for param in inspect.signature(obj).parameters:
            if f"`{param}`" not in args:
                problems.append(f"{name}: argument {param!r} not documented")
    assert not problems, "\n".join(problems)
