"""The hub link: the IoT Hub device connection, its supervision and direct-method dispatch."""
