"""/openapi.json is exact enough that a generated SDK works, and schemathesis finds no
server error or schema violation."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PARITY
from server import Server

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("openapi")).wait_ready()
    yield s
    s.stop()


def test_every_operation_has_an_id_and_typed_errors(server):
    spec = server.client.get("/openapi.json").json()
    ids = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            ids.append(op["operationId"])
            if path.startswith("/v1/"):
                assert "401" in op["responses"], (method, path)
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")) and status != "422":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema["$ref"].endswith("/ErrorBody"), (method, path, status)
    assert len(ids) == len(set(ids))
    assert {"submitParse", "getTask", "getMask", "getPersons", "deleteTask", "getModel"} <= set(ids)


def test_generated_python_client_submits_polls_and_fetches(server, tmp_path):
    (tmp_path / "openapi.json").write_bytes(server.client.get("/openapi.json").content)
    (tmp_path / "config.yaml").write_text("content_type_overrides:\n  image/png: application/octet-stream\n")
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin"}
    subprocess.run([str(VENV_BIN / "openapi-python-client"), "generate", "--path", "openapi.json",
                    "--output-path", "sdk", "--config", "config.yaml"],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    sys.path.insert(0, str(tmp_path / "sdk"))
    try:
        client_mod = importlib.import_module("m2fp_api_client")
        submit = importlib.import_module("m2fp_api_client.api.tasks.submit_parse")
        get_task = importlib.import_module("m2fp_api_client.api.tasks.get_task")
        get_mask = importlib.import_module("m2fp_api_client.api.tasks.get_mask")
        get_persons = importlib.import_module("m2fp_api_client.api.tasks.get_persons")
        get_model = importlib.import_module("m2fp_api_client.api.service.get_model")
        list_models = importlib.import_module("m2fp_api_client.api.service.list_models")
        models = importlib.import_module("m2fp_api_client.models")
        types = importlib.import_module("m2fp_api_client.types")

        client = client_mod.Client(base_url=server.url, raise_on_unexpected_status=True)
        model = get_model.sync(client=client)
        assert model.pretrained is False
        listed = list_models.sync(client=client)
        assert listed.default == model.id and [m.id for m in listed.models] == [model.id]
        photo = (PARITY / "images" / "two_figures.png").read_bytes()
        body = models.BodySubmitParse(file=types.File(payload=photo, file_name="p.png",
                                                      mime_type="image/png"),
                                      outputs="mask,parts,persons", masks="rle", model=listed.default)
        response = submit.sync_detailed(client=client, body=body)
        assert response.status_code in (200, 202)
        task = response.parsed
        deadline = time.monotonic() + 60
        while task.status.value not in ("succeeded", "failed") and time.monotonic() < deadline:
            time.sleep(0.1)
            task = get_task.sync(task.id, client=client)
        assert task.status.value == "succeeded"
        assert task.result.image.width == 500 and task.result.parts
        png = get_mask.sync_detailed(task.id, client=client)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        persons = get_persons.sync_detailed(task.id, client=client)
        assert persons.status_code == 200 and persons.content.startswith(b"\x89PNG")
        missing = get_task.sync_detailed("nope", client=client)
        assert missing.status_code == 404 and missing.parsed.error.code == "not_found"
    finally:
        sys.path.remove(str(tmp_path / "sdk"))
        for name in [m for m in sys.modules if m.startswith("m2fp_api_client")]:
            del sys.modules[name]


def test_schemathesis_finds_no_server_error_or_schema_violation(server):
    """Property-based requests against every operation (bounded for CI)."""
    proc = subprocess.run(
        [str(VENV_BIN / "schemathesis"), "run", f"{server.url}/openapi.json",
         "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance,"
                     "status_code_conformance,response_headers_conformance",
         "--max-examples", "25", "--phases", "examples,coverage,fuzzing", "--no-color",
         "--request-timeout", "30", "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
