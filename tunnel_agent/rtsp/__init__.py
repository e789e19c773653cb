"""RTSP for our own readers: an asyncio client over one TCP connection (interleaved RTP) and pure
parsers (SDP, RTP depacketisers, parameter sets), independent of the relay and of PyAV.

Reading a camera this way costs one ``data_received`` per TCP chunk and a few microseconds of
Python per RTP packet, where FFmpeg's RTSP demuxer polls and reads three times per packet in a
thread of its own.
"""
