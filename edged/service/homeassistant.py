"""Home Assistant discovery, carried out: the node's configs on every (re)connect, and a
wearer's alert sensor the first time its vitals arrive.

Owned by the network thread: `announce` runs in the transport's ready callback and
`wearer_seen` in the Dispatcher, both on paho's network thread, so the set needs no lock.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from edged import __version__
from edged.config.models import EdgedConfig
from edged.mqtt.homeassistant import Discovery, DiscoveryConfigs
from edged.mqtt.payloads import encode
from edged.mqtt.topics import Topics
from edged.service.outbox import Outbox
from edged.service.outcomes import Publish

log = logging.getLogger(__name__)


class DiscoveryAnnouncer:
    def __init__(self, configs: DiscoveryConfigs, outbox: Outbox, max_wearers: int) -> None:
        self._configs = configs
        self._outbox = outbox
        self._max_wearers = max_wearers
        self._wearers: OrderedDict[str, None] = OrderedDict()
        """Wearers announced, least recently seen first; bounded like the vitals state."""

    def announce(self) -> None:
        """Everything, again: after a reconnect the broker may have lost its retained messages
        (a broker without persistence), and Home Assistant reads them only from the broker."""
        configs = self._configs.node() + [self._configs.wearer(w) for w in self._wearers]
        for discovery in configs:
            self._send(discovery)
        log.info("home assistant discovery: %d configs published", len(configs))

    def wearer_seen(self, wearer: str) -> None:
        if wearer in self._wearers:
            self._wearers.move_to_end(wearer)
            return
        self._wearers[wearer] = None
        while len(self._wearers) > self._max_wearers:
            self._wearers.popitem(last=False)  # its retained config stays; it is re-sent if seen
        self._send(self._configs.wearer(wearer))

    def _send(self, discovery: Discovery) -> None:
        topic, config = discovery
        self._outbox.send(Publish(topic, encode(config), retain=True))


def announcer(
    config: EdgedConfig, topics: Topics, model: str | None, outbox: Outbox
) -> DiscoveryAnnouncer | None:
    """The daemon's announcer; None when `homeassistant.enabled` is off."""
    ha = config.homeassistant
    if not ha.enabled:
        return None
    configs = DiscoveryConfigs(
        topics, config.node_id, config.mqtt.topic_prefix, ha.discovery_prefix, __version__, model
    )
    return DiscoveryAnnouncer(configs, outbox, config.clinical.max_wearers)
