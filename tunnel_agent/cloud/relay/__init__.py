"""The relay: consumers connect by TCP, devices connect back by WebSocket, the relay joins them."""
