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
from .result_json import MaskFormat, ModelRef, ParseResultOut, with_masks


@dataclass(frozen=True)
class Parsed:
    """What the renderers draw on: one parse of one photo."""

    result: ParseResult
    photo: Image.Image  # as decoded (perhaps at a reduced scale); outputs are at full size
    overlay_alpha: float
    document: dict  # the ParseResult JSON
    masks: MaskFormat  # how parts.json carries the masks

    def parts_json(self) -> bytes:
        document = with_masks(self.document, self.result) if self.masks is MaskFormat.rle else self.document
        return json.dumps(document).encode()


@dataclass(frozen=True)
class Output:
    name: str
    file_name: str
    media_type: str
    title: str
    renderer: Callable[[Parsed], bytes]
    multi_person: bool = False  # only from models that tell persons apart (not single-human ones)

    def available(self, model: ModelInfo) -> bool:
        return not (self.multi_person and model.single_human)


OUTPUTS: tuple[Output, ...] = (
    Output("mask", "mask.png", "image/png", "Colourised part map at the photo's size",
           lambda parsed: render.mask_png(parsed.result)),
    Output("overlay", "overlay.png", "image/png", "Part map blended over the photo",
           lambda parsed: render.overlay_png(parsed.result, parsed.photo, parsed.overlay_alpha)),
    Output("labels", "labels.png", "image/png", "One channel, pixel value = class id",
           lambda parsed: render.labels_png(parsed.result)),
    Output("parts", "parts.json", "application/json",
           "The ParseResult as a file; with masks=rle, every part's and person's mask as COCO RLE",
           Parsed.parts_json),
    Output("persons", "persons.png", "image/png",
           "One channel, pixel value = person_id + 1 (0 = no person); multi-person models only",
           lambda parsed: render.persons_png(parsed.result), multi_person=True),
)
OUTPUT_NAMES = tuple(output.name for output in OUTPUTS)
_BY_NAME = {output.name: output for output in OUTPUTS}


def output_named(name: str) -> Output:
    return _BY_NAME[name]


def default_outputs(model: ModelInfo) -> tuple[str, ...]:
    """What a parse writes when no outputs are named: all that `model` can produce."""
    return tuple(output.name for output in OUTPUTS if output.available(model))


def unavailable_outputs(names: Iterable[str], model: ModelInfo) -> list[str]:
    return [name for name in names if not output_named(name).available(model)]


def render_outputs(result: ParseResult, photo: Image.Image, names: Iterable[str], overlay_alpha: float,
                   model: ModelInfo, masks: MaskFormat = MaskFormat.none) -> tuple[dict[str, bytes], dict]:
    """The files of the named outputs, by name, and the ParseResult JSON (always built:
    it is the task's result; it never carries the masks)."""
    document = ParseResultOut.build(result, ModelRef.of(model)).model_dump(mode="json")
    parsed = Parsed(result, photo, overlay_alpha, document, masks)
    wanted = set(names)
    return {output.name: output.renderer(parsed) for output in OUTPUTS if output.name in wanted}, document
