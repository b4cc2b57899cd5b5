"""The docs stay true: the README's configuration table lists every setting and only
real ones, api/usage.md every error code, openapi.md the current schema."""

from __future__ import annotations

import re
from pathlib import Path

from m2fp_api.errors import CodedError
from m2fp_api.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
USAGE = README.parent / "src" / "m2fp_api" / "api" / "usage.md"


def test_every_setting_is_documented_in_the_readme_table():
    documented = set(re.findall(r"^\| `(M2FP_[A-Z_]+)` \|", README.read_text(), re.MULTILINE))
    fields = {f"M2FP_{name.upper()}" for name in Settings.model_fields}
    assert documented == fields, {"undocumented": fields - documented, "stale": documented - fields}


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("M2FP_MODEL", "demo")
    monkeypatch.setenv("M2FP_MAX_PIXELS", "1234")
    s = Settings()
    assert s.model == "demo" and s.max_pixels == 1234


def test_openapi_md_is_generated_from_the_current_schema():
    from m2fp_api.api.app import create_app
    from m2fp_api.api.docs import render

    current = (README.parent / "openapi.md").read_text()
    assert current == render(create_app(Settings()).openapi()), "run `make docs`"


def _coded_errors(base: type[CodedError] = CodedError):
    for error in base.__subclasses__():
        yield error
        yield from _coded_errors(error)


def test_every_error_code_means_one_status_and_is_documented():
    statuses: dict[str, set[int]] = {CodedError.code: {CodedError.status}}
    for error in _coded_errors():
        statuses.setdefault(error.code, set()).add(error.status)
    assert {code: s for code, s in statuses.items() if len(s) > 1} == {}
    usage = USAGE.read_text()
    assert [code for code in statuses if f"`{code}`" not in usage] == []
