"""A local IoT Hub emulator: registry, twins and direct methods over REST, authenticated devices
on one MQTT endpoint (a front door in front of mosquitto), DPS."""
