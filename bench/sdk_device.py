"""The footprint baseline: azure-iot-device's client alone, connected as the agent connects.

``python -m bench.sdk_device CONNECTION_STRING CA_FILE`` connects with the same options the agent
uses (PnP model ID in ``product_info``, the hub's CA), prints one JSON line
``{"connected_at": <epoch s>}`` and stays connected until stdin closes. Nothing else is imported:
this is the least a Python IoT Plug and Play device can cost.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from azure.iot.device.aio import IoTHubDeviceClient

MODEL_ID = "dtmi:azure:videoanalyzer:WebSocketTunneling;1"


async def main(connection_string: str, ca_pem: str) -> None:
    client = IoTHubDeviceClient.create_from_connection_string(
        connection_string,
        server_verification_cert=ca_pem,
        product_info=MODEL_ID,
    )
    await client.connect()
    print(json.dumps({"connected_at": time.time()}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await client.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]).read_text()))
