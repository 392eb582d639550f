"""BlockMarket serving land: numpy + onnxruntime + aiomqtt + msgpack. Never imports torch."""
