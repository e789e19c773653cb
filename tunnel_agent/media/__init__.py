"""The media connector: camera sources, snapshot and clip tasks, re-streaming (PyAV)."""
