"""Both models in one service (`M2FP_MODELS`), over real HTTP against a real uvicorn, in
both deployments: each request runs on the model it names (the first by default), the
service lists what it runs, refuses a model it does not, and never shares work between
models."""

from __future__ import annotations

import pytest

from conftest import PARITY
from server import DEPLOYMENTS, TINY_MULTIPLE, TINY_SINGLE, Deployment

PHOTO = (PARITY / "images" / "two_figures.png").read_bytes()
MULTIPLE, SINGLE = "tiny-multiple", "tiny-single"  # the ids of the fixture models' directories


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def server(request, tmp_path_factory):
    deployment = Deployment(tmp_path_factory.mktemp(request.param), request.param,
                            models=f"{TINY_MULTIPLE},{TINY_SINGLE}")
    yield deployment.server
    deployment.stop()


def parts_of(server, form: dict) -> tuple[dict, dict]:
    r = server.submit(PHOTO, outputs="parts", wait=30, **form)
    assert r.status_code in (200, 202), r.text
    task = server.wait_status(r.json()["id"])
    assert task["status"] == "succeeded", task
    return task, server.client.get(task["links"]["parts"]).json()


def test_the_service_lists_every_model_it_runs(server):
    listed = server.client.get("/v1/models").json()
    assert listed["default"] == MULTIPLE
    assert [(m["id"], m["single_human"]) for m in listed["models"]] == [(MULTIPLE, False), (SINGLE, True)]
    for model in listed["models"]:
        labels = server.client.get(model["labels"])
        assert labels.status_code == 200 and [label["name"] for label in labels.json()] == model["classes"]
    # /v1/model describes the default model, as before
    assert server.client.get("/v1/model").json()["id"] == MULTIPLE
    assert server.client.get("/v1/labels").json() == server.client.get(listed["models"][0]["labels"]).json()


def test_each_request_runs_on_the_model_it_names(server):
    _, default = parts_of(server, {})
    _, multiple = parts_of(server, {"model": MULTIPLE})
    single_task, single = parts_of(server, {"model": SINGLE})
    assert default["model"]["id"] == multiple["model"]["id"] == MULTIPLE and multiple["persons"]
    assert single["model"]["id"] == SINGLE and single["persons"] == []
    assert single_task["result"]["model"]["id"] == SINGLE  # the task says which model ran it


def test_identical_photos_on_other_models_are_other_work(server):
    first = server.submit(PHOTO, outputs="mask", wait=30, model=MULTIPLE).json()
    other = server.submit(PHOTO, outputs="mask", wait=30, model=SINGLE).json()
    again = server.submit(PHOTO, outputs="mask", wait=30, model=SINGLE).json()
    assert not other["cached"] and again["cached"]
    masks = [server.client.get(f"/v1/tasks/{t['id']}/mask.png").content
             for t in (server.wait_status(first["id"]), server.wait_status(other["id"]))]
    assert masks[0] != masks[1]


def test_a_model_not_loaded_is_refused_with_its_own_code(server):
    for r in (server.submit(PHOTO, model="no-such-model"),
              server.client.post("/v1/batch", files=[("files", ("a.png", PHOTO, "image/png"))],
                                 data={"model": "no-such-model"}),
              server.client.get("/v1/labels", params={"model": "no-such-model"})):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "unknown_model" and MULTIPLE in error["message"] and SINGLE in error["message"]
