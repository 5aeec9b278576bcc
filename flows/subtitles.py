"""Subtitles as timed text cues: SRT / WebVTT sidecar files and text subtitle streams inside containers.

Cue times are seconds on the video's clock (for embedded streams: from the first video frame, the clock
of a clip's start_s/end_s). The parsers are tolerant of what real files carry (a byte-order mark, CRLF,
a missing final blank line, <i>/<font>/<v> tags, {\\an8}-style tags, WebVTT headers, NOTE/STYLE/REGION
blocks, cue identifiers and settings) and strict where guessing would misplace text in time: a
malformed timing line is a one-line ValueError naming the file and line.
"""

from __future__ import annotations

import codecs
import html
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction

import av

from flows.media import VideoError
from flows.probe import first_line, open_input, primary_video_stream

log = logging.getLogger(__name__)

SIDECAR_EXTENSIONS = (".srt", ".vtt")


@dataclass(frozen=True)
class Cue:
    """Text shown from start_s (inclusive) to end_s (exclusive), in seconds; lines joined by newlines."""

    start_s: float
    end_s: float
    text: str


# --- parsing ------------------------------------------------------------------------------------------

_TIME = r"(?:(\d+):)?(\d{1,2}):(\d{1,2})[,.](\d{1,3})"
# Anything after the end time is cue settings (WebVTT) or coordinates (some SRT writers): ignored.
_TIMING = re.compile(rf"^\s*{_TIME}\s*-->\s*{_TIME}(?:\s.*)?$")
_HTML_TAG = re.compile(r"<[^>]*>")  # <i>, <font color=..>, <v Speaker>, <c.class>, <00:01.500>
_ASS_TAG = re.compile(r"\{\\[^}]*\}")  # {\an8}, {\i1}: SubStation override tags, common in SRT too
_ASS_BLOCK = re.compile(r"\{[^}]*\}")  # in SubStation text every {...} is hidden: tags or comments
_VTT_SKIPPED_BLOCKS = ("NOTE", "STYLE", "REGION")


def parse_srt(text: str, name: str = "<srt>") -> list[Cue]:
    """Cues of a SubRip file, sorted by start; `name` is used in error messages."""
    cues: list[tuple[float, float, list[str]]] = []
    for block in _blocks(text):
        number, first = block[0]
        if "-->" in first:
            timing_at = 0
        elif len(block) > 1 and "-->" in block[1][1]:
            timing_at = 1  # the usual cue number line before the timing
        elif first.strip().isdigit():
            raise ValueError(f"{name}: line {number}: cue {first.strip()} has no timing line")
        elif cues:
            # A blank line inside a cue's text: real files have them; the text belongs to that cue.
            cues[-1][2].extend(_clean_lines(line for _, line in block))
            continue
        else:
            raise ValueError(
                f"{name}: line {number}: expected a cue number or timing line, got {first.strip()!r}"
            )
        start, end = _timing(block[timing_at], name)
        cues.append((start, end, _clean_lines(line for _, line in block[timing_at + 1 :])))
    return _finish(cues)


def parse_vtt(text: str, name: str = "<vtt>") -> list[Cue]:
    """Cues of a WebVTT file, sorted by start; `name` is used in error messages.

    The WEBVTT header block, NOTE, STYLE and REGION blocks are skipped, and so (as the WebVTT parsing
    rules say) is any other block without a timing line.
    """
    blocks = _blocks(text)
    if blocks and blocks[0][0][1].startswith("WEBVTT"):
        # Header lines (Kind:, Language:) end at the first blank line, or at a cue some writers put
        # right under the header.
        cue_at = next((i for i, (_, line) in enumerate(blocks[0]) if "-->" in line), None)
        blocks = ([blocks[0][cue_at:]] if cue_at else []) + blocks[1:]
    cues: list[tuple[float, float, list[str]]] = []
    for block in blocks:
        first = block[0][1]
        if first.split(maxsplit=1)[0] in _VTT_SKIPPED_BLOCKS and "-->" not in first:
            continue
        if "-->" in first:
            timing_at = 0
        elif len(block) > 1 and "-->" in block[1][1]:
            timing_at = 1  # a cue identifier
        else:
            continue
        start, end = _timing(block[timing_at], name)
        cues.append((start, end, _clean_lines(line for _, line in block[timing_at + 1 :])))
    return _finish(cues)


def decode_text(data: bytes) -> str:
    """File bytes as text: UTF-8 (BOM or not), UTF-16 with a BOM, else Windows-1252, else Latin-1."""
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8) :].decode("utf-8", errors="replace")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")  # every byte is a Latin-1 character: never fails


def parse_subtitle_file(name: str, data: bytes) -> list[Cue]:
    """Cues of an .srt or .vtt file's bytes; the WEBVTT header wins over a wrong extension."""
    text = decode_text(data)
    if text.lstrip("\ufeff \t\r\n").startswith("WEBVTT"):
        return parse_vtt(text, name)
    if _extension(name) == ".srt":
        return parse_srt(text, name)
    if _extension(name) == ".vtt":
        return parse_vtt(text, name)
    raise ValueError(f"{name}: not a subtitle file (expected {' or '.join(SIDECAR_EXTENSIONS)})")


def _blocks(text: str) -> list[list[tuple[int, str]]]:
    """Non-blank line runs as [(1-based line number, line)], with BOM and CR/CRLF endings normalised."""
    text = text.lstrip("\ufeff")
    blocks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        if line.strip():
            current.append((number, line))
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def _timing(numbered: tuple[int, str], name: str) -> tuple[float, float]:
    number, line = numbered
    match = _TIMING.match(line)
    if not match:
        raise ValueError(f"{name}: line {number}: malformed timing line {line.strip()!r}")
    start, end = _seconds(match.groups()[:4]), _seconds(match.groups()[4:])
    if start is None or end is None:
        raise ValueError(f"{name}: line {number}: minutes or seconds out of range in {line.strip()!r}")
    if end < start:
        raise ValueError(f"{name}: line {number}: cue ends before it starts in {line.strip()!r}")
    return start, end


def _seconds(parts: tuple[str | None, ...]) -> float | None:
    hours, minutes, seconds, fraction = parts
    if int(minutes) >= 60 or int(seconds) >= 60:
        return None
    # "1,5" is 1.5 s: the digits are a decimal fraction, whatever their count.
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + int(fraction) / 10 ** len(fraction)


def _clean_lines(lines: Iterable[str], substation: bool = False) -> list[str]:
    braces = _ASS_BLOCK if substation else _ASS_TAG
    out = []
    for line in lines:
        plain = html.unescape(braces.sub("", _HTML_TAG.sub("", line)))
        plain = " ".join(plain.split())
        if plain:
            out.append(plain)
    return out


def _finish(cues: list[tuple[float, float, list[str]]]) -> list[Cue]:
    out = [Cue(start, end, "\n".join(lines)) for start, end, lines in cues if lines]
    return sorted(out, key=lambda c: (c.start_s, c.end_s))


# --- selecting text -----------------------------------------------------------------------------------


def text_for_span(cues: Iterable[Cue], start_s: float, end_s: float) -> str:
    """One line: the text of the cues shown at some moment of [start_s, end_s], in time order.

    A cue counts when start <= end_s and end > start_s (a cue ending exactly as the span starts has
    gone; one starting exactly at its end is on screen for the span's last frame).
    """
    if not (math.isfinite(start_s) and math.isfinite(end_s)):
        raise ValueError(f"span: start_s and end_s must be finite, got {start_s!r}, {end_s!r}")
    if end_s < start_s:
        raise ValueError(f"end_s: must be >= start_s ({start_s}), got {end_s}")
    shown = sorted((c for c in cues if c.start_s <= end_s and c.end_s > start_s), key=lambda c: c.start_s)
    return " ".join(" ".join(c.text.split()) for c in shown)


# --- where subtitles come from ------------------------------------------------------------------------


def sidecar_candidates(video_uri: str) -> list[str]:
    """Sidecar files to look for beside a video, in order of preference: same stem, .srt then .vtt.

    `s3://b/show/ep1.mp4` → `s3://b/show/ep1.srt`, `s3://b/show/ep1.vtt`. Language-tagged names
    (`ep1.en.srt`) are not guessed: pick one by renaming it to the plain stem.
    """
    folder, slash, name = video_uri.rpartition("/")
    if not name:
        raise ValueError(f"video_uri: must name a file, got {video_uri!r}")
    stem = name[: -len(_extension(name))] if _extension(name) else name
    return [f"{folder}{slash}{stem}{ext}" for ext in SIDECAR_EXTENSIONS]


def _extension(name: str) -> str:
    base = name.rpartition("/")[2]
    dot = base.rfind(".")
    return base[dot:].lower() if dot > 0 else ""


def read_embedded_subtitles(path: str) -> list[Cue]:
    """Cues of one text subtitle stream in a local media file ([] when it has none).

    Of several text streams, the one marked default is read, else the first; bitmap subtitles (DVD,
    PGS) carry no text and are ignored. A packet that fails to decode is skipped.
    """
    with open_input(path, "subtitles") as container:
        streams = [s for s in container.streams.subtitles if _is_text(s)]
        if not streams:
            return []
        stream = next((s for s in streams if s.disposition & av.stream.Disposition.default), streams[0])
        video = primary_video_stream(container)
        offset = 0.0
        if video is not None and video.start_time is not None:
            offset = float(video.start_time * video.time_base)
        raw: list[tuple[float, float | None, str]] = []
        try:
            for packet in container.demux(stream):
                cue = _packet_cue(stream, packet, offset, path)
                if cue is not None:
                    raw.append(cue)
        except av.FFmpegError as exc:
            log.warning("%s: subtitle stream %d cut short: %s", path, stream.index, first_line(exc))
    return _close_open_ends(raw)


def _is_text(stream: av.stream.Stream) -> bool:
    try:
        return bool(stream.codec_context.codec.text_sub)
    except (AttributeError, ValueError, av.FFmpegError):
        return False  # no decoder for this codec


def _packet_cue(
    stream: av.stream.Stream, packet: av.Packet, offset: float, path: str
) -> tuple[float, float | None, str] | None:
    """(start, end or None when the packet does not say, text) of one subtitle packet."""
    if packet.pts is None or not packet.size:
        return None
    try:
        subtitle = stream.decode2(packet)
    except av.FFmpegError as exc:
        log.debug("%s: subtitle packet at pts %s skipped: %s", path, packet.pts, first_line(exc))
        return None
    if subtitle is None:
        return None
    lines = []
    for rect in subtitle:
        if rect.type in (b"ass", b"text"):
            raw = rect.dialogue if rect.type == b"ass" else rect.text
            lines.extend(_clean_lines(raw.decode("utf-8", errors="replace").split("\n"), substation=True))
    if not lines:
        return None
    at = packet.pts * packet.time_base  # exact (a Fraction) until the end, so cues meet exactly
    start = float(at + Fraction(subtitle.start_display_time, 1000)) - offset
    end = None
    if packet.duration:
        end = float(at + packet.duration * packet.time_base) - offset
    elif subtitle.start_display_time < subtitle.end_display_time < 0xFFFFFFFF:  # UINT32_MAX: unknown
        end = float(at + Fraction(subtitle.end_display_time, 1000)) - offset
    return start, end, "\n".join(lines)


def _close_open_ends(raw: list[tuple[float, float | None, str]]) -> list[Cue]:
    """Cues from (start, end?, text); a cue without an end lasts until the next one starts."""
    raw = sorted(raw, key=lambda r: r[0])
    cues = []
    for i, (start, end, text) in enumerate(raw):
        if end is None:
            end = raw[i + 1][0] if i + 1 < len(raw) else start
        cues.append(Cue(start, max(start, end), text))
    return cues


def load_sidecar(video_uri: str, read_sidecar: Callable[[str], bytes | None]) -> list[Cue] | None:
    """Cues of the video's first sidecar that exists (even an empty one), or None when it has none.

    `read_sidecar(uri)` returns the file's bytes, or None when there is no such file; it is how the
    caller's storage is reached. A sidecar that cannot be read or parsed is a
    VideoError(stage="subtitles") naming the file.
    """
    for candidate in sidecar_candidates(video_uri):
        try:
            data = read_sidecar(candidate)
        except OSError as exc:
            raise VideoError("subtitles", type(exc).__name__, f"{candidate}: {first_line(exc)}") from None
        if data is None:
            continue
        try:
            return parse_subtitle_file(candidate, data)
        except ValueError as exc:
            raise VideoError("subtitles", "MalformedSubtitles", str(exc)) from None
    return None


def load_subtitles(
    video_uri: str, local_path: str | None, read_sidecar: Callable[[str], bytes | None]
) -> list[Cue]:
    """A video's cues: from its sidecar (`load_sidecar`) when it has one, else from the local file's
    text subtitle stream (none read when `local_path` is None)."""
    cues = load_sidecar(video_uri, read_sidecar)
    if cues is not None:
        return cues
    return read_embedded_subtitles(local_path) if local_path is not None else []
