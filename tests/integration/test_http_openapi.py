"""
An OpenAPI description served: the Petstore example's operations answer with
its examples or bodies that fit its schemas, and requests it does not allow get 400.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from netd.testing import NetdProcess
from tests.conftest import StartNetd

PETSTORE = """\
openapi: "3.0.0"
info: {version: 1.0.0, title: Swagger Petstore, license: {name: MIT}}
servers: [{url: "http://petstore.swagger.io/v1"}]
paths:
  /pets:
    get:
      summary: List all pets
      operationId: listPets
      tags: [pets]
      parameters:
        - name: limit
          in: query
          description: How many items to return at one time (max 100)
          required: false
          schema: {type: integer, maximum: 100, format: int32}
      responses:
        "200":
          description: A paged array of pets
          headers:
            x-next: {description: A link to the next page of responses, schema: {type: string}}
          content:
            application/json:
              schema: {$ref: "#/components/schemas/Pets"}
              example: [{id: 1, name: Rex, tag: dog}]
        default:
          description: unexpected error
          content:
            application/json:
              schema: {$ref: "#/components/schemas/Error"}
    post:
      summary: Create a pet
      operationId: createPets
      tags: [pets]
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: "#/components/schemas/Pet"}
      responses:
        "201": {description: Null response}
        default:
          description: unexpected error
          content:
            application/json:
              schema: {$ref: "#/components/schemas/Error"}
  /pets/{petId}:
    get:
      summary: Info for a specific pet
      operationId: showPetById
      tags: [pets]
      parameters:
        - name: petId
          in: path
          required: true
          description: The id of the pet to retrieve
          schema: {type: integer}
      responses:
        "200":
          description: Expected response to a valid request
          content:
            application/json:
              schema: {$ref: "#/components/schemas/Pet"}
        default:
          description: unexpected error
          content:
            application/json:
              schema: {$ref: "#/components/schemas/Error"}
components:
  schemas:
    Pet:
      type: object
      required: [id, name]
      properties:
        id: {type: integer, format: int64}
        name: {type: string, minLength: 2}
        tag: {type: string}
    Pets:
      type: array
      maxItems: 100
      items: {$ref: "#/components/schemas/Pet"}
    Error:
      type: object
      required: [code, message]
      properties:
        code: {type: integer, format: int32}
        message: {type: string}
"""


@pytest.fixture
def netd(start_netd: StartNetd, tmp_path: Path) -> NetdProcess:
    return serve(start_netd, tmp_path, PETSTORE)


def serve(start_netd: StartNetd, tmp_path: Path, description: str) -> NetdProcess:
    """netd serving C{description}, with a route of its own beside the spec's."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(description)
    return start_netd(
        f"""
services:
  api:
    type: http
    listen: ["tcp:0:interface=127.0.0.1"]
    openapi: {spec}
    routes:
      - {{path: /health, body: "ok\\n"}}
"""
    )


def test_operations_answer_with_examples_and_fitting_bodies(netd: NetdProcess) -> None:
    with httpx.Client(base_url=netd.url("api"), timeout=10) as client:
        listed = client.get("/v1/pets", params={"limit": 10})
        assert listed.status_code == 200 and listed.json() == [
            {"id": 1, "name": "Rex", "tag": "dog"}
        ]
        assert listed.headers["content-type"] == "application/json"
        pet = client.get("/v1/pets/7")
        assert pet.status_code == 200 and pet.json() == {"id": 0, "name": "xx"}
        made = client.post("/v1/pets", json={"id": 3, "name": "Tom"})
        assert made.status_code == 201 and made.content == b""
        routes = {r["id"] for r in netd.view("api", "routes")}
        assert {"openapi:listPets", "openapi:createPets", "openapi:showPetById"} <= routes


def test_requests_the_spec_does_not_allow_get_400(netd: NetdProcess) -> None:
    with httpx.Client(base_url=netd.url("api"), timeout=10) as client:
        too_many = client.get("/v1/pets", params={"limit": 1000})
        assert too_many.status_code == 400 and "limit" in too_many.text
        not_a_number = client.get("/v1/pets/rex")
        assert not_a_number.status_code == 400 and "petId" in not_a_number.text
        missing_name = client.post("/v1/pets", json={"id": 3})
        assert missing_name.status_code == 400
        assert "'name' is a required property" in missing_name.text
        short_name = client.post("/v1/pets", json={"id": 3, "name": "T"})
        assert short_name.status_code == 400 and "too short" in short_name.text
        not_json = client.post(
            "/v1/pets", content=b"{", headers={"Content-Type": "application/json"}
        )
        assert not_json.status_code == 400
        unknown = client.delete("/v1/pets/7")
        assert unknown.status_code == 404 and "closest route: openapi:showPetById" in unknown.text
        assert client.get("/health").text == "ok\n"


PATTERNED = """\
openapi: "3.0.0"
info: {version: 1.0.0, title: Patterned Petstore}
servers: [{url: /v1}]
paths:
  /pets/{petId}:
    get:
      operationId: showPet
      parameters:
        - {name: petId, in: path, required: true, schema: {type: string, pattern: "^[a-z]+$"}}
        - {name: code, in: query, schema: {type: string, pattern: "^[0-9]{3}$"}}
        - {name: X-Trace, in: header, schema: {type: string, pattern: "^t-[0-9]+$"}}
      responses:
        "200":
          description: A pet
          content:
            application/json:
              schema:
                type: object
                required: [id, tag, name]
                properties:
                  id: {type: string, pattern: "^[A-Z]{3}-[0-9]{4}$"}
                  tag: {type: string, pattern: "^[a-z]+$", example: rex}
                  name: {type: string, minLength: 2}
  /pets:
    post:
      operationId: createPet
      requestBody:
        required: true
        content:
          application/json:
            schema:
              type: object
              required: [name]
              properties:
                name: {type: string, pattern: "^[a-z]+$"}
      responses:
        "201": {description: Made}
"""


def test_patterns_are_checked_and_followed(start_netd: StartNetd, tmp_path: Path) -> None:
    netd = serve(start_netd, tmp_path, PATTERNED)
    with httpx.Client(base_url=netd.url("api"), timeout=10) as client:
        pet = client.get("/v1/pets/rex", params={"code": "123"}, headers={"X-Trace": "t-1"})
        assert pet.status_code == 200, pet.text
        body = pet.json()
        assert re.fullmatch("[A-Z]{3}-[0-9]{4}", body["id"]) and body["tag"] == "rex"
        for refused in (
            client.get("/v1/pets/REX"),
            client.get("/v1/pets/rex", params={"code": "12"}),
            client.get("/v1/pets/rex", headers={"X-Trace": "trace"}),
            client.post("/v1/pets", json={"name": "Rex"}),
        ):
            assert refused.status_code == 400, (refused.request.url, refused.text)
            assert "does not match" in refused.text
        assert client.post("/v1/pets", json={"name": "rex"}).status_code == 201
