"""Home Assistant MQTT discovery: one HA device per room, entities for each enrolled baby and the room.

Opt-in (``homeassistant.enabled``). Config topics are ``<discovery_prefix>/<component>/cryid_<room>/
<object_id>/config``, retained, published at start, when the roster changes and whenever Home Assistant
announces ``online`` on ``<discovery_prefix>/status`` (it lost its retained state, e.g. a new broker).

- per baby: ``event`` *cry* (an identification on ``<prefix>/baby/<id>``; the event type is the event's
  ``kind``, ``expiration`` or ``episode``; every payload field becomes an attribute) and
  ``binary_sensor`` *crying* (on with a provisional event, off with the episode's final event or
  ``off_delay`` later);
- per room: ``binary_sensor`` *crying* (any baby, ``<prefix>/status/crying``), ``event`` *unknown cry*
  (``<prefix>/unknown``), ``sensor`` *microphone* (``ok``/``flat``/``down`` on ``<prefix>/status/source``)
  and ``sensor`` *level* (``input_level_dbfs`` of ``<prefix>/stats``).

Every entity is available while ``<prefix>/status`` is ``online`` (several rooms in one daemon: and the
daemon's own ``status``, the connection's last will, see :mod:`cryid.daemon.multi`). A baby that leaves
the roster (removed, discharged, moved) has its configs deleted by an empty retained payload; the topics
published are remembered in ``<state_dir>/homeassistant.json`` (several rooms:
``<state_dir>/rooms/<room>/``) so this works across restarts too.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import Field

from cryid.models.files import atomic_write
from cryid.models.strict import StrictModel

logger = logging.getLogger(__name__)

ROSTER_FILE = "homeassistant.json"
# An event payload is JSON with ``event_type``: ours is the CryEvent itself plus event_type = kind.
EVENT_TEMPLATE = "{{ dict(value_json, event_type=value_json.kind) | to_json }}"
EVENT_TYPES = ["expiration", "episode"]

Message = tuple[str, str, bool]  # (topic, payload, retain)


class HomeAssistantSettings(StrictModel):
    """Home Assistant MQTT discovery (entities appear in HA by themselves)."""

    enabled: bool = Field(False, description="Publish Home Assistant MQTT discovery configs.")
    discovery_prefix: str = Field(
        "homeassistant",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="HA's discovery prefix (see HA's MQTT settings); HA announces itself on <prefix>/status.",
    )


def object_id(baby_id: str) -> str:
    """A baby id as an HA object id (letters, digits, ``_``, ``-``); other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", baby_id)


class Discovery:
    """Builds the retained discovery configs of one room; remembers what it published."""

    def __init__(
        self,
        settings: HomeAssistantSettings,
        room: str,
        topic_prefix: str,
        episode_gap_s: float,
        state_dir: Path | None = None,
        sw_version: str = "",
        daemon_status_topic: str | None = None,
    ) -> None:
        self.settings = settings
        self.daemon_status_topic = daemon_status_topic  # several rooms: the daemon's status (its last will)
        self.room = room
        self.prefix = topic_prefix
        self.node = f"cryid_{room}"
        self.ha_status_topic = f"{settings.discovery_prefix}/status"
        self.crying_topic = f"{topic_prefix}/status/crying"
        self.source_topic = f"{topic_prefix}/status/source"
        # a crying sensor falls back to off this long after the last provisional event
        self.off_delay_s = max(5, math.ceil(2 * episode_gap_s))
        self.roster_file = None if state_dir is None else Path(state_dir).expanduser() / ROSTER_FILE
        self.device = {
            "identifiers": [self.node],
            "name": f"cryid {room}",
            "manufacturer": "cryid",
            "model": "newborn cry identification",
            "sw_version": sw_version or "unknown",
        }
        self.published: set[str] = self._load()

    # payloads ------------------------------------------------------------------------------------
    def _topic(self, component: str, obj: str) -> str:
        return f"{self.settings.discovery_prefix}/{component}/{self.node}/{obj}/config"

    def _common(self, obj: str, name: str) -> dict[str, Any]:
        common: dict[str, Any] = {"name": name, "unique_id": f"{self.node}_{obj}", "device": self.device}
        if self.daemon_status_topic is None:
            common["availability_topic"] = f"{self.prefix}/status"
        else:  # available while the room and the daemon (whose last will it is) are both online
            common["availability"] = [{"topic": f"{self.prefix}/status"}, {"topic": self.daemon_status_topic}]
            common["availability_mode"] = "all"
        return common | {"payload_available": "online", "payload_not_available": "offline", "qos": 1}

    def baby_configs(self, baby_id: str) -> list[tuple[str, dict[str, Any]]]:
        obj = object_id(baby_id)
        topic = f"{self.prefix}/baby/{baby_id}"
        event = self._common(f"baby_{obj}_cry", f"{baby_id} cry") | {
            "state_topic": topic,
            "event_types": EVENT_TYPES,
            "value_template": EVENT_TEMPLATE,
            "icon": "mdi:emoticon-cry-outline",
        }
        crying = self._common(f"baby_{obj}_crying", f"{baby_id} crying") | {
            "state_topic": topic,
            "value_template": "{{ 'ON' if value_json.kind == 'expiration' else 'OFF' }}",
            "payload_on": "ON",
            "payload_off": "OFF",
            "off_delay": self.off_delay_s,
            "device_class": "sound",
        }
        return [
            (self._topic("event", f"baby_{obj}_cry"), event),
            (self._topic("binary_sensor", f"baby_{obj}_crying"), crying),
        ]

    def room_configs(self) -> list[tuple[str, dict[str, Any]]]:
        crying = self._common("crying", "crying") | {
            "state_topic": self.crying_topic,
            "payload_on": "ON",
            "payload_off": "OFF",
            "device_class": "sound",
        }
        unknown = self._common("unknown_cry", "unknown cry") | {
            "state_topic": f"{self.prefix}/unknown",
            "event_types": EVENT_TYPES,
            "value_template": EVENT_TEMPLATE,
            "icon": "mdi:account-question",
        }
        microphone = self._common("microphone", "microphone") | {
            "state_topic": self.source_topic,
            "device_class": "enum",
            "options": ["ok", "flat", "down"],
            "entity_category": "diagnostic",
            "icon": "mdi:microphone",
        }
        level = self._common("level", "input level") | {
            "state_topic": f"{self.prefix}/stats",
            "value_template": "{{ value_json.input_level_dbfs }}",
            "unit_of_measurement": "dBFS",
            "state_class": "measurement",
            "entity_category": "diagnostic",
            "icon": "mdi:volume-high",
        }
        return [
            (self._topic("binary_sensor", "crying"), crying),
            (self._topic("event", "unknown_cry"), unknown),
            (self._topic("sensor", "microphone"), microphone),
            (self._topic("sensor", "level"), level),
        ]

    # messages ------------------------------------------------------------------------------------
    def messages(self, babies: Iterable[str]) -> list[Message]:
        """Every config for this roster, then an empty retained payload for each config published
        before that is no longer wanted (a baby removed or discharged); remembers the new set."""
        wanted = self.room_configs()
        for baby in sorted(set(babies)):
            wanted += self.baby_configs(baby)
        out: list[Message] = [(t, json.dumps(p, separators=(",", ":")), True) for t, p in wanted]
        keep = {t for t, _ in wanted}
        stale = sorted(self.published - keep)
        out += [(t, "", True) for t in stale]
        if stale:
            logger.info("Home Assistant: deleting %d entities of babies no longer on the roster", len(stale))
        self.published = keep
        self._save()
        return out

    def is_ha_online(self, topic: str, payload: bytes) -> bool:
        """HA's birth message: republish every config."""
        return topic == self.ha_status_topic and payload.strip() == b"online"

    # what was published (across restarts) --------------------------------------------------------
    def _load(self) -> set[str]:
        if self.roster_file is None or not self.roster_file.is_file():
            return set()
        try:
            data = json.loads(self.roster_file.read_text(encoding="utf-8"))
            return {str(t) for t in data["topics"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning(
                "Home Assistant: %s unreadable (%s); entities of babies discharged while cryid was "
                "stopped stay in HA until deleted there",
                self.roster_file,
                exc,
            )
            return set()

    def _save(self) -> None:
        if self.roster_file is None:
            return
        try:
            atomic_write(self.roster_file, json.dumps({"topics": sorted(self.published)}, indent=1))
        except OSError as exc:
            logger.warning(
                "Home Assistant: cannot write %s (%s); check the state directory", self.roster_file, exc
            )
