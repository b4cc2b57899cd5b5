"""What a submission asked to be told, and what became of each delivery: kept on the
task's handle, so every API process shows it in the task's JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..errors import BadRequest

# in the order a task reaches them
EVENTS = ("started", "completed")
DEFAULT_EVENTS = ("completed",)
MAX_URL_LENGTH = 2048


@dataclass
class Delivery:
    """One event's delivery: how many attempts so far and how the last one went."""

    event: str
    attempts: int = 0
    delivered: bool = False
    status_code: int | None = None  # the receiver's last answer
    error: str | None = None  # why the last attempt failed when there was no answer (or it was refused)
    last_attempt_at: float | None = None


@dataclass
class Subscription:
    url: str
    deliveries: list[Delivery] = field(default_factory=list)  # one per event asked for, in EVENTS order

    @property
    def events(self) -> tuple[str, ...]:
        return tuple(d.event for d in self.deliveries)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Subscription":
        return cls(url=d["url"], deliveries=[Delivery(**each) for each in d["deliveries"]])


def parse_subscription(url: str | None, events: str | None) -> Subscription | None:
    """The form fields `webhook` and `webhook_events`, checked for form only (where the
    URL leads is the AddressPolicy's to judge). BadRequest on a bad value."""
    if url is None:
        if events is not None:
            raise BadRequest("webhook_events needs a webhook URL.")
        return None
    parts = urlsplit(url)
    try:
        parts.port  # a port that is no number raises
    except ValueError:
        raise BadRequest("webhook has an invalid port.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > MAX_URL_LENGTH:
        raise BadRequest(f"webhook must be an http or https URL of at most {MAX_URL_LENGTH} characters.")
    if parts.username is not None or parts.password is not None:
        raise BadRequest("webhook must not carry credentials; deliveries are signed instead.")
    names = DEFAULT_EVENTS
    if events is not None:
        asked = {e.strip() for e in events.split(",") if e.strip()}
        if not asked or asked - set(EVENTS):
            raise BadRequest(f"webhook_events must be a comma list of {','.join(EVENTS)}.")
        names = tuple(e for e in EVENTS if e in asked)
    return Subscription(url=url, deliveries=[Delivery(e) for e in names])
