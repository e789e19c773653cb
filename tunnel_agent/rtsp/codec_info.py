"""What a stream's parameter sets say about it: the picture size, chroma format, bit depth and
reordering depth (B-frames) from an H.264 or H.265 SPS, the sample rate and channels from an AAC
AudioSpecificConfig. Pure code; enough of each syntax to reach those fields (H.264 7.3.2.1.1 and
E.1.1, H.265 7.3.2.2, ISO 14496-3 1.6.2.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunnel_agent.rtsp.errors import RtspProtocolError

H264_BASELINE = 66
H264_EXTENDED_SAR = 255
H264_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})
AAC_SAMPLE_RATES = (
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
)  # fmt: skip
# Chroma subsampling (SubWidthC, SubHeightC) by chroma_format_idc.
CHROMA_SUBSAMPLING = {0: (1, 1), 1: (2, 2), 2: (2, 1), 3: (1, 1)}


@dataclass(frozen=True)
class Picture:
    width: int
    height: int
    chroma_format: int  # chroma_format_idc: 0 monochrome, 1 4:2:0, 2 4:2:2, 3 4:4:4
    bit_depth: int  # luma


class BitReader:
    """Big-endian bits and Exp-Golomb codes of an RBSP (emulation prevention already removed)."""

    def __init__(self, data: bytes) -> None:
        self._value = int.from_bytes(data, "big")
        self._bits = len(data) * 8
        self._position = 0

    def bits(self, count: int) -> int:
        if self._position + count > self._bits:
            raise RtspProtocolError("the camera's parameter set ends early")
        self._position += count
        return (self._value >> (self._bits - self._position)) & ((1 << count) - 1)

    def skip(self, count: int) -> None:
        self.bits(count)

    def ue(self) -> int:
        zeros = 0
        while self.bits(1) == 0:
            zeros += 1
            if zeros > 31:
                raise RtspProtocolError("the camera's parameter set has a bad Exp-Golomb code")
        return (1 << zeros) - 1 + self.bits(zeros)

    def se(self) -> int:
        code = self.ue()
        return (code + 1) // 2 if code & 1 else -(code // 2)


def rbsp(unit: bytes, header_bytes: int) -> bytes:
    """A NAL unit's payload after its header, emulation-prevention bytes removed."""
    payload = bytearray()
    zeros = 0
    for byte in unit[header_bytes:]:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        payload.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(payload)


def h264_picture(sps: bytes) -> Picture:
    return _h264_sequence(BitReader(rbsp(sps, 1)))[0]


def h264_reorder_frames(sps: bytes) -> int | None:
    """How many frames the decoder may hold back for reordering (B-frames): the SPS's VUI
    ``max_num_reorder_frames``; 0 for the profiles without B-frames; None when the SPS does not
    say (an encoder may leave the bitstream restriction out)."""
    reader = BitReader(rbsp(sps, 1))
    _, profile = _h264_sequence(reader)
    if profile == H264_BASELINE:
        return 0
    try:
        if not reader.bits(1):  # vui_parameters_present_flag
            return None
        return _h264_vui_reorder_frames(reader)
    except RtspProtocolError:
        return None  # a VUI cut short says nothing either


def _h264_sequence(reader: BitReader) -> tuple[Picture, int]:
    """The picture and the profile; ``reader`` is left at ``vui_parameters_present_flag``."""
    profile = reader.bits(8)
    reader.skip(16)  # constraint flags, level
    reader.ue()  # seq_parameter_set_id
    chroma, separate_planes, bit_depth = 1, 0, 8
    if profile in H264_HIGH_PROFILES:
        chroma = reader.ue()
        if chroma == 3:
            separate_planes = reader.bits(1)
        bit_depth = 8 + reader.ue()
        reader.ue()  # bit_depth_chroma_minus8
        reader.skip(1)  # qpprime_y_zero_transform_bypass_flag
        if reader.bits(1):  # seq_scaling_matrix_present_flag
            for index in range(8 if chroma != 3 else 12):
                if reader.bits(1):
                    _skip_scaling_list(reader, 16 if index < 6 else 64)
    reader.ue()  # log2_max_frame_num_minus4
    order_type = reader.ue()
    if order_type == 0:
        reader.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif order_type == 1:
        reader.skip(1)
        reader.se()
        reader.se()
        for _ in range(reader.ue()):
            reader.se()
    reader.ue()  # max_num_ref_frames
    reader.skip(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = reader.ue() + 1
    height_units = reader.ue() + 1
    frame_mbs_only = reader.bits(1)
    if not frame_mbs_only:
        reader.skip(1)  # mb_adaptive_frame_field_flag
    reader.skip(1)  # direct_8x8_inference_flag
    width = width_mbs * 16
    height = (2 - frame_mbs_only) * height_units * 16
    if reader.bits(1):  # frame_cropping_flag
        left, right, top, bottom = reader.ue(), reader.ue(), reader.ue(), reader.ue()
        array_type = 0 if separate_planes else chroma
        sub_width, sub_height = CHROMA_SUBSAMPLING[array_type] if array_type else (1, 1)
        width -= sub_width * (left + right)
        height -= sub_height * (2 - frame_mbs_only) * (top + bottom)
    return Picture(width, height, chroma, bit_depth), profile


def _h264_vui_reorder_frames(reader: BitReader) -> int | None:
    """E.1.1 up to ``max_num_reorder_frames``."""
    if reader.bits(1) and reader.bits(8) == H264_EXTENDED_SAR:  # aspect_ratio_info, idc
        reader.skip(32)
    if reader.bits(1):  # overscan_info_present_flag
        reader.skip(1)
    if reader.bits(1):  # video_signal_type_present_flag
        reader.skip(4)
        if reader.bits(1):  # colour_description_present_flag
            reader.skip(24)
    if reader.bits(1):  # chroma_loc_info_present_flag
        reader.ue()
        reader.ue()
    if reader.bits(1):  # timing_info_present_flag
        reader.skip(65)
    nal_hrd = reader.bits(1)
    if nal_hrd:
        _skip_hrd(reader)
    vcl_hrd = reader.bits(1)
    if vcl_hrd:
        _skip_hrd(reader)
    if nal_hrd or vcl_hrd:
        reader.skip(1)  # low_delay_hrd_flag
    reader.skip(1)  # pic_struct_present_flag
    if not reader.bits(1):  # bitstream_restriction_flag
        return None
    reader.skip(1)  # motion_vectors_over_pic_boundaries_flag
    for _ in range(4):  # max bytes per picture, bits per macroblock, motion vector lengths
        reader.ue()
    return reader.ue()


def _skip_hrd(reader: BitReader) -> None:
    count = reader.ue() + 1
    reader.skip(8)  # bit_rate_scale, cpb_size_scale
    for _ in range(count):
        reader.ue()
        reader.ue()
        reader.skip(1)
    reader.skip(20)  # four delay and offset lengths


def _skip_scaling_list(reader: BitReader, size: int) -> None:
    last, following = 8, 8
    for _ in range(size):
        if following:
            following = (last + reader.se() + 256) % 256
        last = following or last


def h265_picture(sps: bytes) -> Picture:
    return _h265_sequence(BitReader(rbsp(sps, 2)))[0]


def h265_reorder_frames(sps: bytes) -> int:
    """``sps_max_num_reorder_pics`` of the highest sub-layer: pictures held back for reordering."""
    reader = BitReader(rbsp(sps, 2))
    _, sub_layers = _h265_sequence(reader)
    reader.ue()  # bit_depth_chroma_minus8
    reader.ue()  # log2_max_pic_order_cnt_lsb_minus4
    every_layer = reader.bits(1)  # sps_sub_layer_ordering_info_present_flag
    reorder = 0
    for _ in range(sub_layers + 1 if every_layer else 1):
        reader.ue()  # sps_max_dec_pic_buffering_minus1
        reorder = reader.ue()
        reader.ue()  # sps_max_latency_increase_plus1
    return reorder


def _h265_sequence(reader: BitReader) -> tuple[Picture, int]:
    """The picture and ``sps_max_sub_layers_minus1``; ``reader`` is left after the luma bit
    depth."""
    reader.skip(4)  # sps_video_parameter_set_id
    sub_layers = reader.bits(3)  # sps_max_sub_layers_minus1
    reader.skip(1)  # sps_temporal_id_nesting_flag
    reader.skip(96)  # general profile, tier, level
    present = [(reader.bits(1), reader.bits(1)) for _ in range(sub_layers)]
    if sub_layers:
        reader.skip(2 * (8 - sub_layers))
    for profile_present, level_present in present:
        reader.skip(88 * profile_present + 8 * level_present)
    reader.ue()  # sps_seq_parameter_set_id
    chroma = reader.ue()
    if chroma > 3:
        raise RtspProtocolError("the camera's H.265 SPS has a bad chroma format")
    separate_planes = reader.bits(1) if chroma == 3 else 0
    width, height = reader.ue(), reader.ue()
    if reader.bits(1):  # conformance_window_flag
        left, right, top, bottom = reader.ue(), reader.ue(), reader.ue(), reader.ue()
        sub_width, sub_height = CHROMA_SUBSAMPLING[0 if separate_planes else chroma]
        width -= sub_width * (left + right)
        height -= sub_height * (top + bottom)
    bit_depth = 8 + reader.ue()
    return Picture(width, height, chroma, bit_depth), sub_layers


@dataclass(frozen=True)
class AudioConfig:
    object_type: int
    sample_rate: int
    channels: int


def aac_config(audio_specific_config: bytes) -> AudioConfig:
    reader = BitReader(audio_specific_config)
    object_type = reader.bits(5)
    if object_type == 31:
        object_type = 32 + reader.bits(6)
    index = reader.bits(4)
    if index == 15:
        sample_rate = reader.bits(24)
    elif index < len(AAC_SAMPLE_RATES):
        sample_rate = AAC_SAMPLE_RATES[index]
    else:
        raise RtspProtocolError("the camera's AAC configuration has a bad sample rate")
    return AudioConfig(object_type, sample_rate, reader.bits(4))
