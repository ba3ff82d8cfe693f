"""Cheap metadata probe of a video file with PyAV: the display timeline and the quirks that matter.

One pass over the container demuxes every packet of the first video stream (no decoding, except
the first frame, whose display matrix gives the rotation) and records:

- the display timeline: presentation timestamps (pts, in `time_base` ticks) of the frames a player
  shows, sorted. Packets FFmpeg's mov demuxer flags `discard` are left out: they are the pre-roll
  an MP4 edit list hides (a stream-copied cut, `ffmpeg -ss X -c copy`), which FFmpeg decodes only
  as references and never outputs (libavcodec drops frames decoded from discard packets);
- an edit list (some packet flagged discard), a variable frame rate (the gaps between consecutive
  display timestamps differ by more than one tick and more than 1 %), a missing container duration
  (live WebM/Matroska), rotation (display matrix, degrees counter-clockwise as
  `av_display_rotation_get` reports it, rounded to a multiple of 90), the sample aspect ratio
  (SAR; a player shows a W x H frame as W*SAR x H);
- truncation: an MP4 sample table (PyAV `index_entries`) that points past the end of the file, a
  packet FFmpeg flags corrupt (a partial read at the end of the data), or fewer packets than the
  header's frame count. `intact_before` is then the decode timestamp of the first incomplete
  packet, or one tick past the last demuxed packet's when the lost packets simply are not there:
  every frame displayed before it was decoded from intact packets only (pts >= dts for every
  frame, and references come earlier in decode order), which is the intact prefix.

Errors are `ClipFailure`s: `no_video` (no video stream, e.g. audio only), `unsupported_codec` (no
decoder for the stream's codec in PyAV's FFmpeg build; named by its MP4 sample-entry fourcc when
there is one; also an animated WebP, which FFmpeg's webp decoder cannot read), `still_image` (one
picture read by an FFmpeg image demuxer, `IMAGE_DEMUXERS`: a PNG, JPEG, WebP, BMP, TIFF or one-frame
GIF/APNG, whatever its file name says; an animated GIF or APNG is a video), `truncated` (FFmpeg
cannot open the file and an MP4 box runs past its end: an interrupted copy of a file whose index
comes last), `decode_error` (anything else FFmpeg cannot open). Sources: FFmpeg's mov demuxer (edit lists -> AV_PKT_FLAG_DISCARD, partial reads ->
AV_PKT_FLAG_CORRUPT), libavutil/display.h (rotation), ISO/IEC 14496-12 (boxes).

    p = probe_video("clip.mp4")
    p.display_pts, p.time_base, p.edit_list, p.vfr, p.rotation, p.sar
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from carv_attrib.video.failures import ClipFailure
from carv_attrib.video.member import av_input, close_input, open_source, source_bytes_available


@dataclass
class VideoProbe:
    """Facts about one video file. Timestamps are integer ticks of `time_base` (seconds = ticks * tb)."""

    path: str
    container: str  # FFmpeg demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    codec: str  # codec name as FFmpeg's descriptor names it, e.g. "h264", "av1", "vp9"
    decoder: str  # the FFmpeg decoder PyAV uses, e.g. "h264", "libdav1d"
    width: int  # stored (coded picture) size, pixels
    height: int
    sar: Fraction  # sample aspect ratio; 1 when unset
    rotation: int  # degrees counter-clockwise, one of 0, 90, 180, 270
    time_base: Fraction  # seconds per tick
    avg_rate: float | None  # the stream's average frame rate (frames/s) as FFmpeg reports it
    duration: float | None  # container duration in seconds; None when the container has none
    header_frames: int  # frame count the container header states (0 = unknown, e.g. Matroska)
    packets: int  # non-empty video packets demuxed
    discarded: int  # packets flagged discard (edit-list pre-roll)
    display_pts: list[int] = field(default_factory=list)  # pts of displayed frames, ascending
    end_pts: int = 0  # end of the last displayed frame (its pts + its duration), ticks
    edit_list: bool = False
    vfr: bool = False
    truncated: bool = False
    truncation: str = ""  # what shows the truncation, for the failure message
    intact_before: int | None = None  # dts of the first lost packet (None: all intact)
    first_frame_error: str | None = None  # decoding the first frame failed with this

    @property
    def display_width(self) -> int:
        """Width a player shows, after SAR and rotation (pixels)."""
        w = round(self.width * self.sar)
        return self.height if self.rotation in (90, 270) else w

    @property
    def display_height(self) -> int:
        w = round(self.width * self.sar)
        return w if self.rotation in (90, 270) else self.height

    def seconds(self, pts: int) -> float:
        return float(pts * self.time_base)

    def facts(self) -> dict[str, Any]:
        """JSON-ready summary (no per-frame lists)."""
        d = asdict(self)
        d.pop("display_pts")
        d["sar"] = f"{self.sar.numerator}:{self.sar.denominator}"
        d["time_base"] = f"{self.time_base.numerator}/{self.time_base.denominator}"
        d["display_frames"] = len(self.display_pts)
        d["start"] = self.seconds(self.display_pts[0]) if self.display_pts else None
        d["end"] = self.seconds(self.end_pts) if self.display_pts else None
        d["end_pts"] = self.end_pts
        d["display_width"] = self.display_width
        d["display_height"] = self.display_height
        return d


@functools.lru_cache(maxsize=64)
def codec_name(codec_id: int, decoder_name: str) -> str:
    """The codec's own name (e.g. "av1") rather than its decoder's ("libdav1d"): the native FFmpeg
    decoder with the same codec id is named after the codec descriptor."""
    import av

    if not decoder_name.startswith("lib"):
        return decoder_name
    for name in sorted(av.codec.codecs_available):
        if name.startswith("lib"):
            continue
        try:
            c = av.codec.Codec(name, "r")
        except Exception:  # encoder-only names
            continue
        if c.id == codec_id:
            return name
    return decoder_name


def _rotation_of(frame: Any) -> int:
    rot = getattr(frame, "rotation", 0) or 0  # PyAV >= 14: av_display_rotation_get, counter-clockwise
    return int(round(float(rot) / 90.0)) * 90 % 360


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}"


_MP4_TOP = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"uuid", b"pdin", b"moof", b"mfra", b"meta"}


def _top_boxes(f: Any, size: int) -> Iterator[tuple[int, int, bytes]]:
    """(offset, size, type) of each top-level ISO-BMFF box of the open file `f` of `size` bytes.

    Box layout per ISO/IEC 14496-12 4.2: 32-bit big-endian size (1 = a 64-bit size follows, 0 = to
    the end of the file) and a 4-byte type. Stops at a box that cannot be walked (size 0 or < 8)."""
    off = 0
    while off + 8 <= size:
        f.seek(off)
        head = f.read(16)
        box, kind = int.from_bytes(head[:4], "big"), head[4:8]
        if box == 1 and len(head) == 16:
            box = int.from_bytes(head[8:16], "big")
        if box < 8:  # 0 (to the end) or corrupt: nothing after it to walk
            return
        yield off, box, kind
        off += box


def mp4_box_overrun(path: str) -> str | None:
    """If `path` is ISO-BMFF (MP4/MOV) and a top-level box runs past the end of the file, say so.
    Reads only the box headers (`_top_boxes`)."""
    size = source_bytes_available(path)
    with open_source(path) as f:
        for off, box, kind in _top_boxes(f, size):
            if off == 0 and kind not in _MP4_TOP:
                return None
            if off + box > size:
                name = kind.decode("latin-1")
                return f"the '{name}' box at byte {off} needs {box} bytes but the file ends at byte {size}"
    return None


def mp4_video_fourcc(path: str, limit: int = 64 << 20) -> str | None:
    """The sample-entry type (fourcc, e.g. "avc1", "av01") of the first video track of an MP4/MOV, to
    name a codec FFmpeg has no decoder for. Reads the top-level box headers and the moov box (up to
    `limit` bytes); None when not found. Layout per ISO/IEC 14496-12 (hdlr handler_type "vide", then
    that track's stsd: version/flags, entry_count, first entry's size and type)."""
    with open_source(path) as f:
        for off, box, kind in _top_boxes(f, source_bytes_available(path)):
            if kind == b"moov":
                f.seek(off)
                moov = f.read(min(box, limit))
                for trak in moov.split(b"trak")[1:]:
                    h = trak.find(b"hdlr")
                    st = trak.find(b"stsd")
                    if h >= 0 and trak[h + 12 : h + 16] == b"vide" and st >= 0:
                        return trak[st + 16 : st + 20].decode("latin-1")
                return None
    return None


# FFmpeg's demuxers for picture formats: img2dec.c's "<format>_pipe" probes (png_pipe, jpeg_pipe,
# webp_pipe, bmp_pipe, tiff_pipe, ...), image2 itself, and the two that also hold animations (gif,
# apng) or an animated JPEG XL. yuv4mpegpipe is a raw video format, not one of them.
IMAGE_DEMUXERS = frozenset({"image2", "image2pipe", "gif", "apng", "jpegxl_anim"})


def is_image_demuxer(name: str) -> bool:
    """Whether FFmpeg demuxer `name` (VideoProbe.container) reads picture files (`IMAGE_DEMUXERS`)."""
    return name in IMAGE_DEMUXERS or name.endswith("_pipe")


def animated_webp(path: str) -> bool:
    """Whether `path` is an animated WebP: a RIFF/WEBP file whose VP8X chunk sets the animation flag
    (WebP container spec: 'RIFF' size 'WEBP' 'VP8X' size, then flags, animation = bit 1)."""
    with open_source(path) as f:
        head = f.read(21)
    return len(head) == 21 and head[:4] == b"RIFF" and head[8:16] == b"WEBPVP8X" and bool(head[20] & 0x02)


def still_image_failure(p: VideoProbe) -> ClipFailure | None:
    """`still_image` when `p` is one picture read by an image demuxer (`is_image_demuxer`), else None.

    A picture has one frame and no timeline (FFmpeg gives it a nominal 25 fps), so a frame policy
    could only repeat it; an image file with several frames (an animated GIF or APNG) is a video."""
    if not is_image_demuxer(p.container) or p.packets - p.discarded > 1:
        return None
    return ClipFailure(
        "still_image",
        f"a still image ({p.codec}, {p.width}x{p.height}, read by FFmpeg's {p.container} demuxer), not a "
        "video: one picture, no timeline",
        {"container": p.container, "codec": p.codec, "width": p.width, "height": p.height},
    )


# Leading bytes of the picture formats FFmpeg's image demuxers read (PNG, JPEG, GIF, WebP, BMP, TIFF,
# QOI, JPEG XL codestream and container), from each format's specification.
IMAGE_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"qoif",
    b"\xff\x0a",
    b"\x00\x00\x00\x0cJXL ",
)


def looks_like_image(path: str) -> bool:
    """Whether the regular file `path` starts like a picture file (`IMAGE_SIGNATURES`, or RIFF....WEBP).
    Reads 16 bytes; a cheap filter before probing (`still_image_of`)."""
    with open(path, "rb") as f:
        head = f.read(16)
    return head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def still_image_of(path: str) -> ClipFailure | None:
    """The `still_image` failure of a regular file that is a picture, else None (a video, or anything
    that is not a picture, which decoding judges). Only a file that starts like a picture is probed,
    so a caller can ask in its own process before a model loads (`score` refuses such a query)."""
    if not os.path.isfile(path) or not looks_like_image(path):
        return None
    try:
        probe_video(path)
    except ClipFailure as exc:
        return exc if exc.kind == "still_image" else None
    return None


def refuse_still_images(paths: list[Any], command: str = "score") -> None:
    """UsageError (exit 2) naming the first of `paths` that is a picture (`still_image_of`), with the
    command's advice: a query PNG named .mp4 would otherwise fail as too_short after the model loads,
    or with a --pad-short run be scored as F copies of one frame."""
    from carv_attrib.errors import UsageError
    from carv_attrib.video.failures import failure_message

    for p in paths:
        still = still_image_of(str(p))
        if still is not None:
            raise UsageError(f"{p}: {failure_message(still, command)}")


def probe_video(path: str) -> VideoProbe:
    """Probe `path` (see the module docstring). Raises ClipFailure no_video / unsupported_codec /
    still_image / decode_error; a truncated file is reported in the result (`truncated`), not raised.
    `path` may name a member of a tar or Arrow file (`video.member`): its bytes are read in place."""
    src = av_input(path)
    try:
        return _probe(path, src)
    finally:
        close_input(src)


def _probe(path: str, src: Any) -> VideoProbe:
    import av

    try:
        container = av.open(src)
    except Exception as exc:  # av.error.InvalidDataError & co.: not a container FFmpeg can read
        overrun = mp4_box_overrun(path)
        if overrun:  # e.g. an interrupted copy of an MP4 whose index (moov) comes after the data
            raise ClipFailure(
                "truncated", f"the file ends early: {overrun}; FFmpeg cannot open it ({_short(exc)})"
            ) from exc
        raise ClipFailure("decode_error", f"cannot open as a video container: {_short(exc)}") from exc
    with container:
        if not container.streams.video:
            kinds = ", ".join(f"{s.type} ({s.codec_context.name})" for s in container.streams) or "none"
            raise ClipFailure("no_video", f"no video stream (streams: {kinds})")
        stream = container.streams.video[0]
        cc = stream.codec_context
        if cc is None or cc.codec is None:
            tag = mp4_video_fourcc(path) if "mp4" in container.format.name else None
            named = f"codec tag {tag!r}" if tag else "its codec"
            raise ClipFailure(
                "unsupported_codec",
                f"no decoder for the video stream ({named}) in PyAV {av.__version__}'s FFmpeg build",
            )
        codec = codec_name(cc.codec.id, cc.codec.name)
        cc.thread_count = 1  # deterministic, and the pool parallelises across clips
        sar = Fraction(1)
        raw_sar = stream.sample_aspect_ratio or cc.sample_aspect_ratio
        if raw_sar is not None and raw_sar.numerator > 0 and raw_sar.denominator > 0:
            sar = Fraction(raw_sar.numerator, raw_sar.denominator)
        tb = Fraction(stream.time_base.numerator, stream.time_base.denominator)
        size = source_bytes_available(path)
        truncation = ""
        try:
            entries = stream.index_entries  # MP4: the whole sample table; Matroska: cues only
            if entries and "mp4" in container.format.name:
                beyond = sum(1 for e in entries if e.pos + e.size > size)
                if beyond:
                    truncation = (
                        f"{beyond} of {len(entries)} samples lie past the end of the file ({size} bytes)"
                    )
        except Exception:  # older PyAV without index_entries: the packet checks below still apply
            pass

        pts: list[int] = []
        durations: dict[int, int] = {}
        packets = discarded = 0
        first_bad_dts: int | None = None
        last_dts: int | None = None
        first_frame: Any = None
        first_error: str | None = None
        try:
            for pkt in container.demux(stream):
                if pkt.size == 0:  # the demuxer's end-of-stream flush packet
                    continue
                packets += 1
                if pkt.dts is not None and not pkt.is_corrupt:
                    last_dts = pkt.dts if last_dts is None else max(last_dts, pkt.dts)
                if pkt.is_corrupt and first_bad_dts is None:
                    first_bad_dts = pkt.dts if pkt.dts is not None else pkt.pts
                    truncation = truncation or f"packet {packets} is incomplete (data ends at byte {size})"
                if first_frame is None and first_error is None:
                    try:
                        got = cc.decode(pkt)
                        if got:
                            first_frame = got[0]
                    except Exception as exc:
                        first_error = _short(exc)
                if pkt.is_discard:
                    discarded += 1
                    continue
                if pkt.pts is None:
                    continue
                pts.append(pkt.pts)
                durations[pkt.pts] = pkt.duration or 0
        except Exception as exc:  # a demux error midway: keep what was read, as a truncation
            truncation = truncation or f"demuxing stopped after {packets} packets: {_short(exc)}"
        if first_frame is None and first_error is None:
            try:
                got = cc.decode(None)
                first_frame = got[0] if got else None
            except Exception as exc:
                first_error = _short(exc)
        header_frames = int(stream.frames or 0)
        if header_frames and packets < header_frames:
            truncation = truncation or f"{packets} of the {header_frames} frames the header lists are present"
        if truncation and first_bad_dts is None and last_dts is not None:
            # The lost packets all come after the demuxed ones in decode order, so their dts (<= pts)
            # exceed the last demuxed dts: every frame shown up to that instant is intact.
            first_bad_dts = last_dts + 1
        pts.sort()
        # Duplicate timestamps (a muxer that rounded two frames to one tick): one frame per instant,
        # the first decoded (see video._decode_pyav); FFmpeg's CLI instead nudges the later one by a
        # tick. pyav_reasons sends such files to PyAV.
        if len(pts) != len(set(pts)):
            pts = sorted(set(pts))
        # Rate regularity is judged on the intact part: lost packets leave holes that are not VFR.
        steady = [t for t in pts if first_bad_dts is None or t < first_bad_dts]
        gaps = [b - a for a, b in zip(steady, steady[1:])]
        typical = sorted(gaps)[len(gaps) // 2] if gaps else 0
        vfr = bool(gaps) and any(abs(g - typical) > max(1, typical // 100) for g in gaps)
        end_pts = 0
        if pts:
            last = durations.get(pts[-1], 0) or typical or 1
            end_pts = pts[-1] + last
        avg = stream.average_rate
        duration = float(container.duration) / 1e6 if container.duration else None
        if container.format.name == "webp_pipe" and animated_webp(path):
            raise ClipFailure(
                "unsupported_codec",
                f"an animated WebP: the webp decoder in PyAV {av.__version__}'s FFmpeg build reads still "
                "WebP only (convert it to a video, e.g. an MP4)",
            )
        result = VideoProbe(
            path=path,
            container=container.format.name,
            codec=codec,
            decoder=cc.codec.name,
            width=cc.width,
            height=cc.height,
            sar=sar,
            rotation=_rotation_of(first_frame) if first_frame is not None else 0,
            time_base=tb,
            avg_rate=float(avg) if avg else None,
            duration=duration,
            header_frames=header_frames,
            packets=packets,
            discarded=discarded,
            display_pts=pts,
            end_pts=end_pts,
            edit_list=discarded > 0,
            vfr=vfr,
            truncated=bool(truncation),
            truncation=truncation,
            intact_before=first_bad_dts,
            first_frame_error=first_error,
        )
        still = still_image_failure(result)
        if still is not None:
            raise still
        return result
