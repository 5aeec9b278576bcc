"""Subtitles: SRT/WebVTT parsing, span selection, sidecars, and text streams in real containers."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from av.subtitles.subtitle import SubtitleSet

from flows.media import VideoError
from flows.subtitles import (
    Cue,
    decode_text,
    load_sidecar,
    load_subtitles,
    parse_srt,
    parse_subtitle_file,
    parse_vtt,
    read_embedded_subtitles,
    sidecar_candidates,
    text_for_span,
)

# What a subtitle site or a Windows editor writes: BOM, CRLF, tags, an out-of-order cue, a blank line
# inside a cue, SRT coordinates, a one-digit fraction, no final newline.
SRT = (
    "\ufeff1\r\n"
    "00:00:01,000 --> 00:00:03,500\r\n"
    "<i>Where are you going,</i>\r\n"
    '<font color="#ffff00">Tom &amp; Jerry?</font>\r\n'
    "\r\n"
    "3\r\n"
    "00:00:09,000 --> 00:00:10,000 X1:100 X2:500 Y1:10 Y2:60\r\n"
    "{\\an8}Up here. {sic}\r\n"
    "\r\n"
    "2\r\n"
    "00:00:04,2 --> 00:00:06,000\r\n"
    "First part\r\n"
    "\r\n"
    "second part after a blank line\r\n"
    "\r\n"
    "4\r\n"
    "01:02:03,004 --> 01:02:04,000\r\n"
    "Last line without newline"
)

VTT = """WEBVTT - Some title
Kind: captions
Language: en

STYLE
::cue(.yellow) { color: yellow; }

REGION
id:fred width:40%

NOTE This file was written
by hand, and this note spans --> two lines.

intro
00:01.000 --> 00:04.000 align:start position:10% line:0
<v Roger Bingham>We are in <c.yellow>New York</c> &lt;city&gt;

00:00:05.000 --> 00:00:07.000
Karaoke <00:00:05.500>style <00:00:06.000>words

chapter-2
00:07.000 --> 00:08.000
"""


def test_parse_srt_real_world_file():
    cues = parse_srt(SRT)
    assert cues == [
        Cue(1.0, 3.5, "Where are you going,\nTom & Jerry?"),
        Cue(4.2, 6.0, "First part\nsecond part after a blank line"),
        Cue(9.0, 10.0, "Up here. {sic}"),
        Cue(3723.004, 3724.0, "Last line without newline"),
    ]


def test_parse_srt_without_cue_numbers_and_with_dot_fractions():
    cues = parse_srt("00:00:01.250 --> 00:00:02.000\nno numbers\n\n00:00:03.000 --> 00:00:04.000\nok\n")
    assert cues == [Cue(1.25, 2.0, "no numbers"), Cue(3.0, 4.0, "ok")]


def test_parse_vtt_skips_header_style_region_note_and_strips_tags():
    assert parse_vtt(VTT) == [
        Cue(1.0, 4.0, "We are in New York <city>"),
        Cue(5.0, 7.0, "Karaoke style words"),
    ]  # the cue with an identifier but no text is dropped


def test_parse_vtt_with_a_cue_right_under_the_header_and_crlf():
    text = (
        "\ufeffWEBVTT\r\n00:00.500 --> 00:01.500\r\nfirst\r\n\r\n"
        "lonely-identifier\r\n\r\n00:02.000 --> 00:03.000\r\nsecond"
    )
    assert parse_vtt(text) == [Cue(0.5, 1.5, "first"), Cue(2.0, 3.0, "second")]


@pytest.mark.parametrize(
    ("parse", "text", "line", "why"),
    [
        (parse_srt, "1\n00:00:01,000 --> 00:00:0x,000\nhi\n", 2, "malformed timing line"),
        (
            parse_srt,
            "1\r\n00:00:01,000 --> 00:00:02,000\r\nok\r\n\r\n2\r\n00:00:03,000 -> 00:00:04,000\r\nx",
            5,
            "has no timing line",
        ),
        (parse_srt, "1\n00:00:01,000 --> 00:61:02,000\nhi\n", 2, "out of range"),
        (parse_srt, "1\n00:00:05,000 --> 00:00:02,000\nhi\n", 2, "ends before it starts"),
        (parse_srt, "hello there\n00:00:01,000\n", 1, "expected a cue number or timing line"),
        (parse_vtt, "WEBVTT\n\nid\n00:01.000 --> 1:00:02\nhi\n", 4, "malformed timing line"),
    ],
)
def test_malformed_timing_is_an_error_naming_the_line(parse, text, line, why):
    with pytest.raises(ValueError, match=rf"^subs\.x: line {line}: .*{why}") as err:
        parse(text, "subs.x")
    assert "\n" not in str(err.value)


def test_decode_text_encodings():
    text = "1\n00:00:01,000 --> 00:00:02,000\nCafé déjà vu\n"
    for data in (
        text.encode("utf-8"),
        b"\xef\xbb\xbf" + text.encode("utf-8"),
        text.encode("utf-16"),  # with its BOM, as Windows Notepad saves "Unicode"
        text.encode("cp1252"),
    ):
        assert decode_text(data) == text
    assert decode_text(b"\x81\x8d") == "\x81\x8d"  # undefined in cp1252: Latin-1, never an exception


def test_parse_subtitle_file_picks_the_format():
    srt = "1\n00:00:01,000 --> 00:00:02,000\nhi\n"
    assert parse_subtitle_file("s3://b/v.srt", srt.encode("cp1252")) == [Cue(1.0, 2.0, "hi")]
    assert parse_subtitle_file("v.SRT", ("WEBVTT\n\n" + srt.replace(",", ".")).encode()) == [
        Cue(1.0, 2.0, "hi")
    ]
    with pytest.raises(ValueError, match=r"^v\.txt: not a subtitle file"):
        parse_subtitle_file("v.txt", srt.encode())


CUES = [Cue(1.0, 2.0, "one"), Cue(1.5, 3.0, "two\nlines"), Cue(5.0, 6.0, "three")]


@pytest.mark.parametrize(
    ("start", "end", "text"),
    [
        (0.0, 1.0, "one"),  # a cue starting exactly at the span's last frame is shown on it
        (2.0, 2.5, "two lines"),  # "one" ended exactly at 2.0: gone
        (0.0, 0.99, ""),
        (1.6, 1.6, "one two lines"),  # a one-frame clip
        (3.0, 5.0, "three"),  # "two" ends exactly at 3.0
        (0.0, 100.0, "one two lines three"),
    ],
)
def test_text_for_span_boundaries(start, end, text):
    assert text_for_span(CUES, start, end) == text


def test_text_for_span_is_in_time_order_and_checks_the_span():
    assert text_for_span(list(reversed(CUES)), 0.0, 10.0) == "one two lines three"
    with pytest.raises(ValueError, match=r"^end_s: must be >= start_s"):
        text_for_span(CUES, 2.0, 1.0)


def test_sidecar_candidates():
    assert sidecar_candidates("s3://bucket/show/ep1.mp4") == [
        "s3://bucket/show/ep1.srt",
        "s3://bucket/show/ep1.vtt",
    ]
    assert sidecar_candidates("file:///data/v.1/clip.MKV") == [
        "file:///data/v.1/clip.srt",
        "file:///data/v.1/clip.vtt",
    ]
    assert sidecar_candidates("/data/noext") == ["/data/noext.srt", "/data/noext.vtt"]
    with pytest.raises(ValueError, match=r"^video_uri: "):
        sidecar_candidates("s3://bucket/show/")


# --- embedded streams ---------------------------------------------------------------------------------

NASA_CUES = [
    (0.21, 4.26, "NAR: This is the optical and science segment of the Webb"),
    (4.26, 8.35, "space telescope in one of the largest cleanrooms in the world"),
    (8.35, 12.47, "at NASA’s Goddard Space Flight Center in Greenbelt, Maryland."),
    (12.47, 16.57, "This half of the observatory element successfully"),
]


def test_reads_the_mov_text_stream_of_a_real_file(shared_videos):
    cues = read_embedded_subtitles(str(shared_videos / "torchcodec" / "nasa_13013.mp4"))
    # Two identical English streams in the file: one is read, not both.
    assert [c.text for c in cues] == [text for _, _, text in NASA_CUES]
    times = [t for c in cues for t in (c.start_s, c.end_s)]
    assert times == pytest.approx([t for start, end, _ in NASA_CUES for t in (start, end)])
    assert text_for_span(cues, 3.0, 5.0) == f"{NASA_CUES[0][2]} {NASA_CUES[1][2]}"


def test_a_video_without_subtitle_streams_has_no_cues(shared_videos):
    assert read_embedded_subtitles(str(shared_videos / "mmaction2" / "demo.mp4")) == []


def test_not_a_video_is_a_subtitles_error(tmp_path):
    bad = tmp_path / "junk.mp4"
    bad.write_bytes(b"this is not a video at all" * 10)
    with pytest.raises(VideoError) as err:
        read_embedded_subtitles(str(bad))
    assert err.value.stage == "subtitles" and str(bad) in err.value.message


ASS_HEADER = (
    b"[Script Info]\nScriptType: v4.00+\n\n[V4+ Styles]\n"
    b"Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, Bold, "
    b"Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, Alignment, "
    b"MarginL, MarginR, MarginV, Encoding\n"
    b"Style: Default,Arial,16,&Hffffff,&Hffffff,&H0,&H0,0,0,0,0,100,100,0,0,1,1,0,2,10,10,10,0\n\n"
    b"[Events]\nFormat: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text\n"
)


def write_video_with_subtitles(
    path: Path, tracks: list[tuple[str, list[tuple[float, float, str]], bool]]
) -> None:
    """A 3 s H.264 video with text subtitle streams [(codec, [(start, end, ASS text)], default)].

    Uses PyAV's subtitle encoder (PyAV >= 16.1), the way ffmpeg muxes subtitles.
    """
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        streams = []
        for codec, _, default in tracks:
            stream = out.add_stream(codec)
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = stream.time_base
            stream.codec_context.subtitle_header = ASS_HEADER
            stream.disposition = av.stream.Disposition.default if default else av.stream.Disposition(0)
            streams.append(stream)
        for i in range(30):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 8, np.uint8), format="rgb24")
            out.mux(video.encode(frame))
        out.mux(video.encode())
        for stream, (_, cues, _) in zip(streams, tracks, strict=True):
            for n, (start, end, text) in enumerate(cues):
                ms = round((end - start) * 1000)
                packet = stream.codec_context.encode_subtitle(
                    SubtitleSet.create(
                        f"{n},0,Default,,0,0,0,,{text}".encode(), 0, ms, pts=round(start * 1e6)
                    )
                )
                packet.stream = stream
                packet.pts = packet.dts = round(start * 1000)
                packet.duration = ms
                out.mux(packet)


@pytest.mark.parametrize(
    ("suffix", "codec"), [(".mp4", "mov_text"), (".mkv", "subrip"), (".mkv", "webvtt"), (".mkv", "ass")]
)
def test_reads_text_streams_written_by_pyav(tmp_path, suffix, codec):
    path = tmp_path / f"video{suffix}"
    # An ASS comment ({...} without a backslash) is hidden; ffmpeg's WebVTT encoder mangles it, so not there.
    comment = "" if codec == "webvtt" else "{a comment}"
    cues = [(0.5, 1.25, f"Hello {{\\i1}}world{{\\i0}}{comment}"), (2.0, 2.75, "Second\\Nline, ünïcode")]
    write_video_with_subtitles(path, [(codec, cues, True)])
    assert read_embedded_subtitles(str(path)) == [
        Cue(0.5, 1.25, "Hello world"),
        Cue(2.0, 2.75, "Second\nline, ünïcode"),
    ]


def test_the_default_text_stream_is_read(tmp_path):
    path = tmp_path / "two_tracks.mkv"
    write_video_with_subtitles(
        path, [("subrip", [(0.0, 1.0, "commentary")], False), ("subrip", [(0.0, 1.0, "dialogue")], True)]
    )
    assert [c.text for c in read_embedded_subtitles(str(path))] == ["dialogue"]


# --- load_subtitles -----------------------------------------------------------------------------------


def test_load_prefers_the_sidecar_srt_then_vtt(shared_videos):
    nasa = str(shared_videos / "torchcodec" / "nasa_13013.mp4")
    files = {
        "s3://b/nasa.srt": b"1\n00:00:00,000 --> 00:00:01,000\nfrom srt\n",
        "s3://b/nasa.vtt": b"WEBVTT\n\n00:00.000 --> 00:01.000\nfrom vtt\n",
    }
    asked = []

    def read(uri):
        asked.append(uri)
        return files.get(uri)

    assert load_subtitles("s3://b/nasa.mp4", nasa, read) == [Cue(0.0, 1.0, "from srt")]
    del files["s3://b/nasa.srt"]
    assert load_subtitles("s3://b/nasa.mp4", nasa, read) == [Cue(0.0, 1.0, "from vtt")]
    files.clear()
    assert [c.text for c in load_subtitles("s3://b/nasa.mp4", nasa, read)] == [c[2] for c in NASA_CUES]
    assert asked == [
        "s3://b/nasa.srt",
        "s3://b/nasa.srt",
        "s3://b/nasa.vtt",
        "s3://b/nasa.srt",
        "s3://b/nasa.vtt",
    ]
    assert load_subtitles("s3://b/nasa.mp4", None, read) == []
    assert load_sidecar("s3://b/nasa.mp4", read) is None
    files["s3://b/nasa.vtt"] = b"WEBVTT\n"
    assert load_sidecar("s3://b/nasa.mp4", read) == [] == load_subtitles("s3://b/nasa.mp4", nasa, read)


def test_load_turns_a_bad_sidecar_into_a_subtitles_error():
    def read(uri):
        return b"1\n00:00:01,000 --> 00:00:xx,000\nhi\n" if uri.endswith(".srt") else None

    with pytest.raises(VideoError) as err:
        load_subtitles("s3://b/v.mp4", None, read)
    assert (err.value.stage, err.value.error_type) == ("subtitles", "MalformedSubtitles")
    assert err.value.message.startswith("s3://b/v.srt: line 2: malformed timing line")

    def unreadable(uri):
        raise PermissionError(13, "Access Denied")

    with pytest.raises(VideoError, match=r"s3://b/v\.srt: Access Denied") as err:
        load_subtitles("s3://b/v.mp4", None, unreadable)
    assert err.value.error_type == "PermissionError"
