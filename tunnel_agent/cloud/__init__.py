"""The cloud side: the relay that consumers use, and a local IoT Hub emulator for development."""
