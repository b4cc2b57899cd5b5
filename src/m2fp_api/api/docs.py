"""Render openapi.md: hand-written usage, then a reference generated from the app's
OpenAPI schema. `make docs` rewrites it; a test fails when it is out of date."""

from __future__ import annotations

import json
from importlib import resources

from ..settings import Settings
from .app import create_app

USAGE = resources.files("m2fp_api.api").joinpath("usage.md")


def _type(schema: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list[{_type(schema.get('items', {}))}]"
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if schema.get("format") == "binary":
        return "file"
    return schema.get("type", "object") + (f" ({schema['format']})" if "format" in schema else "")


def _fields(schema: dict) -> list[str]:
    required = set(schema.get("required", []))
    rows = ["| field | type | required | description |", "| --- | --- | --- | --- |"]
    for name, prop in schema.get("properties", {}).items():
        desc = (prop.get("description") or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{name}` | {_type(prop).replace('|', chr(92) + '|')} | "
                    f"{'yes' if name in required else ''} | {desc} |")
    return rows


def render(spec: dict) -> str:
    out = [USAGE.read_text().rstrip(), "", "## Reference (generated from `/openapi.json`)", ""]
    schemas = spec.get("components", {}).get("schemas", {})
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            out += [f"### `{method.upper()} {path}`", "", f"{op.get('summary', '')} — operationId "
                    f"`{op['operationId']}`", ""]
            params = [p for p in op.get("parameters", [])]
            if params:
                out += ["Parameters: " + ", ".join(f"`{p['name']}` ({p['in']})" for p in params), ""]
            body = op.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                ref = _type(content["schema"])
                out += [f"Body (`{media}`):", ""] + _fields(schemas.get(ref, content["schema"])) + [""]
            out.append("Responses: " + "; ".join(
                f"**{status}** " + ", ".join(
                    f"{_type(c.get('schema', {})) if c.get('schema') else media}"
                    for media, c in r.get("content", {}).items()) or f"**{status}**"
                for status, r in op["responses"].items()))
            out.append("")
    out += ["## Schemas", ""]
    for name, schema in sorted(schemas.items()):
        if name.startswith(("Body_", "HTTPValidationError", "ValidationError")):
            continue
        out += [f"### {name}", ""]
        if "enum" in schema:
            out += ["One of: " + ", ".join(f"`{v}`" for v in schema["enum"]), ""]
        else:
            out += _fields(schema) + [""]
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    print(render(json.loads(json.dumps(create_app(Settings()).openapi()))), end="")


if __name__ == "__main__":
    main()
