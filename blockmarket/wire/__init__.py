"""The wire: the msgpack protocol, the MQTT transport, the embedded broker."""
