"""A local IoT Hub emulator: mosquitto with TLS as the device endpoint, plus the service side."""
