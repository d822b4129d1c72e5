"""The broker fixture starts a real Mosquitto that accepts MQTT 5 clients."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.broker import Broker


def test_broker_round_trip(broker: Broker) -> None:
    got = threading.Event()
    received: list[bytes] = []

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        received.append(msg.payload)
        got.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = on_message
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        c.subscribe("t/#", qos=1)[0]
        import time

        time.sleep(0.2)
        c.publish("t/x", b"hello", qos=1).wait_for_publish(5)
        assert got.wait(5)
        assert received == [b"hello"]
    finally:
        c.loop_stop()
        c.disconnect()
