"""Names fixed by the WebSocketTunneling IoT Plug and Play interface (see dtdl/)."""

from typing import Final

MODEL_ID: Final = "dtmi:azure:videoanalyzer:WebSocketTunneling;1"
TUNNEL_OPEN_METHOD: Final = "tunnelOpen"

FIELD_REMOTE_ENDPOINT: Final = "remoteEndpoint"
FIELD_REMOTE_AUTHORIZATION_TOKEN: Final = "remoteAuthorizationToken"
FIELD_LOCAL_PORT: Final = "localPort"
REQUEST_FIELDS: Final = (FIELD_REMOTE_ENDPOINT, FIELD_REMOTE_AUTHORIZATION_TOKEN, FIELD_LOCAL_PORT)

HEADER_CONNECTION_SOURCE: Final = "TunnelConnectionSource"
CONNECTION_SOURCE_PNP_DEVICE: Final = "PnpDevice"
