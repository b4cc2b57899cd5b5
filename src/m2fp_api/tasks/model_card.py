"""What the service knows of its models, wherever they run: one value per model.

The in-process executor takes them from the HumanParsers it loaded; each Celery worker
process publishes its own to Redis, and API processes read them from there. Routes and
admission use only these: each model's info (`/v1/models`, the content key), its
configuration (labels, network input sizes) and the photo limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import TypeAdapter

from ..engine import HumanParser, ModelInfo
from ..engine.images import ImageLimits
from ..errors import ModelUnavailable, UnknownModel
from ..model import M2FPConfig
from ..settings import Settings


@dataclass(frozen=True)
class ModelCard:
    info: ModelInfo
    config: M2FPConfig
    limits: ImageLimits

    @classmethod
    def of(cls, parser: HumanParser) -> "ModelCard":
        return cls(info=parser.info, config=parser.config, limits=parser.limits)


def cards_to_json(cards: tuple[ModelCard, ...]) -> bytes:
    return _CARDS_JSON.dump_json(cards)


def cards_from_json(raw: bytes | str) -> tuple[ModelCard, ...]:
    return _CARDS_JSON.validate_json(raw)


def card_named(cards: tuple[ModelCard, ...], model_id: str | None) -> ModelCard:
    """The card of `model_id`, or of the default model (the first) when None."""
    if model_id is None:
        return cards[0]
    for card in cards:
        if card.info.id == model_id:
            return card
    raise UnknownModel(f"No model `{model_id}` is loaded here; this service runs "
                       f"{', '.join(c.info.id for c in cards)} (GET /v1/models).")


class LoadedModels:
    """The models one process runs tasks on (`M2FP_MODELS`), each loaded and warmed, by
    id, the default first."""

    def __init__(self, parsers: dict[str, HumanParser]) -> None:
        self.parsers = parsers
        self.cards = tuple(ModelCard.of(parser) for parser in parsers.values())

    @classmethod
    def load(cls, settings: Settings) -> "LoadedModels":
        parsers: dict[str, HumanParser] = {}
        for ref in settings.model_refs:
            parser = HumanParser.from_settings(settings, ref)
            if parser.info.id in parsers:
                # a request names its model by id: two of one id could not be told apart
                raise ModelUnavailable(f"Two entries of M2FP_MODELS are both `{parser.info.id}`; list each model once.")
            parser.warm_up()
            parsers[parser.info.id] = parser
        return cls(parsers)

    def parser(self, model_id: str | None) -> HumanParser:
        return self.parsers[card_named(self.cards, model_id).info.id]

    def compiling(self) -> bool:
        """Whether a background compile is still running for any of them."""
        return any(p.compiler is not None and p.compiler.running for p in self.parsers.values())


# pydantic reads and writes the nested frozen dataclasses (tuples included) as they are
_CARDS_JSON = TypeAdapter(tuple[ModelCard, ...])
