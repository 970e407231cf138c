"""Message transport: the interface, an in-memory fake, and (in ``transport.mqtt``) the paho adapter."""

from edge_agent.transport.base import InboundMessage, MqttSettings, Transport, TransportListener, Will, topic_matches
from edge_agent.transport.fake import FakeBroker, FakeTransport

__all__ = [
    "FakeBroker",
    "FakeTransport",
    "InboundMessage",
    "MqttSettings",
    "Transport",
    "TransportListener",
    "Will",
    "topic_matches",
]
