"""The event-type vocabulary shared by the data loader (trainer/data/events.py) and POST /events.

An event is `click` (the default), `like`, `cart` or `purchase`; a larger code is a stronger action. Common
spellings of public logs are accepted as aliases (RetailRocket view/addtocart/transaction, Taobao pv/fav/buy).
"""

from __future__ import annotations

EVENT_TYPES = ("click", "like", "cart", "purchase")  # code = position; a larger code is a stronger action
EVENT_ALIASES = {"view": "click", "pv": "click", "fav": "like", "addtocart": "cart", "buy": "purchase",
                 "transaction": "purchase"}


def normalize_event(value: str | None) -> str:
    """The vocabulary name of an event string (case and spaces ignored, aliases resolved, missing/empty = click);
    ValueError naming the accepted values otherwise."""
    name = (value or "").strip().lower() or "click"
    name = EVENT_ALIASES.get(name, name)
    if name not in EVENT_TYPES:
        raise ValueError(f"unknown event type {value!r}, expected one of {', '.join(EVENT_TYPES)}")
    return name
