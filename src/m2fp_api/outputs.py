"""The outputs of a parse, in one list: the name a client asks for (`outputs=`, the
CLI's `--outputs`, a Task's links), the file name (under /v1/tasks/{id}/, and the CLI's
`<photo>.<file name>`), the media type, a title for people, and how it is rendered.
The worker, the CLI and the routes read them from here; the page reads them from
`/v1/model`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterable

from PIL import Image

from . import render
from .engine import ModelInfo, ParseResult
from .result_json import ModelRef, ParseResultOut


@dataclass(frozen=True)
class Parsed:
    """What the renderers draw on: one parse of one photo."""

    result: ParseResult
    photo: Image.Image  # as decoded (perhaps at a reduced scale); outputs are at full size
    overlay_alpha: float
    document: dict  # the ParseResult JSON


@dataclass(frozen=True)
class Output:
    name: str
    file_name: str
    media_type: str
    title: str
    renderer: Callable[[Parsed], bytes]


OUTPUTS: tuple[Output, ...] = (
    Output("mask", "mask.png", "image/png", "Colourised part map at the photo's size",
           lambda parsed: render.mask_png(parsed.result)),
    Output("overlay", "overlay.png", "image/png", "Part map blended over the photo",
           lambda parsed: render.overlay_png(parsed.result, parsed.photo, parsed.overlay_alpha)),
    Output("labels", "labels.png", "image/png", "One channel, pixel value = class id",
           lambda parsed: render.labels_png(parsed.result)),
    Output("parts", "parts.json", "application/json", "The ParseResult as a file",
           lambda parsed: json.dumps(parsed.document).encode()),
)
OUTPUT_NAMES = tuple(output.name for output in OUTPUTS)
_BY_NAME = {output.name: output for output in OUTPUTS}


def output_named(name: str) -> Output:
    return _BY_NAME[name]


def render_outputs(result: ParseResult, photo: Image.Image, names: Iterable[str], overlay_alpha: float,
                   model: ModelInfo) -> tuple[dict[str, bytes], dict]:
    """The files of the named outputs, by name, and the ParseResult JSON (always built:
    it is the task's result)."""
    document = ParseResultOut.build(result, ModelRef.of(model)).model_dump(mode="json")
    parsed = Parsed(result, photo, overlay_alpha, document)
    wanted = set(names)
    return {output.name: output.renderer(parsed) for output in OUTPUTS if output.name in wanted}, document
