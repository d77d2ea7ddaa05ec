"""Images in requests: where they may come from and what is accepted, checked before any decode.

Sources: `data:` URIs with base64 (`data:image/png;base64,...`) and bare base64 always; local
paths (or `file://`) only under `--allowed-local-media-path` (the resolved path, symlinks
followed, must lie inside it); `http(s)://` only for hosts in `--allowed-media-domains`, with
every redirect hop checked against the same list, a time limit and a byte cap. Every image is
then opened from its header with a format allow-list and refused when its pixel count is over
the cap (a decompression bomb is refused before a single pixel is decoded); the engine decodes
it later from the same bytes.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from .protocol import ApiError

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_B64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}")


@dataclass
class MediaPolicy:
    allowed_local_path: str | None = None          # a directory, or None: no local files
    allowed_domains: list[str] = field(default_factory=list)   # hostnames; empty: no remote fetches
    max_images: int = 20
    max_image_bytes: int = 20 << 20
    max_pixels: int = 40_000_000
    fetch_timeout_s: float = 10.0

    def load_all(self, refs: list[str]) -> list[bytes]:
        if len(refs) > self.max_images:
            raise ApiError(422, f"{len(refs)} images in one request; at most {self.max_images} are allowed",
                           param="image_url")
        return [self.load(r, i) for i, r in enumerate(refs)]

    def load(self, ref: str, index: int = 0) -> bytes:
        where = f"image {index + 1}"
        if ref.startswith("data:"):
            data = _data_uri(ref, where)
        elif ref.startswith(("http://", "https://")):
            data = self._fetch(ref, where)
        elif ref.startswith("file://"):
            data = self._local(urllib.parse.unquote(ref[len("file://"):]), where)
        elif _looks_base64(ref):
            data = _b64(ref, where)
        else:
            data = self._local(ref, where)
        if len(data) > self.max_image_bytes:
            raise ApiError(413, f"{where} is {len(data)} bytes; the limit is {self.max_image_bytes}", param="image_url")
        self.check_header(data, where)
        return data

    def check_header(self, data: bytes, where: str) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                    w, h = im.size
        except (UnidentifiedImageError, Image.DecompressionBombError):
            raise ApiError(422, f"{where} is not a readable image (accepted formats: {', '.join(FORMATS)})",
                           param="image_url") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise ApiError(422, f"{where} is corrupt: {' '.join(str(e).split())}", param="image_url") from None
        if w * h > self.max_pixels:
            raise ApiError(422, f"{where} is {w}x{h} = {w * h} pixels; the limit is {self.max_pixels}",
                           param="image_url")

    def _local(self, path: str, where: str) -> bytes:
        if not self.allowed_local_path:
            raise ApiError(403, f"{where}: local files are not allowed on this server (start it with "
                                f"--allowed-local-media-path DIR)", param="image_url")
        root = os.path.realpath(self.allowed_local_path)
        full = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, full]) != root:
            raise ApiError(403, f"{where}: {path!r} is outside the allowed media folder", param="image_url")
        if not os.path.isfile(full):
            raise ApiError(422, f"{where}: no such file {path!r} in the allowed media folder", param="image_url")
        if os.path.getsize(full) > self.max_image_bytes:
            raise ApiError(413, f"{where} is {os.path.getsize(full)} bytes; the limit is {self.max_image_bytes}",
                           param="image_url")
        with open(full, "rb") as f:
            return f.read()

    def _allowed_host(self, url: str) -> bool:
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        return urllib.parse.urlsplit(url).scheme in ("http", "https") and host in {d.lower() for d in self.allowed_domains}

    def _fetch(self, url: str, where: str) -> bytes:
        if len(url) > 4096:
            raise ApiError(422, f"{where}: the URL is longer than 4096 characters", param="image_url")
        if not self._allowed_host(url):
            raise ApiError(403, f"{where}: fetching {urllib.parse.urlsplit(url).hostname!r} is not allowed "
                                f"(--allowed-media-domains)", param="image_url")
        policy = self

        class _Redirects(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, req, fp, code, msg, headers, newurl):
                if not policy._allowed_host(newurl):
                    raise ApiError(403, f"{where}: a redirect to {urllib.parse.urlsplit(newurl).hostname!r} "
                                        f"is not allowed", param="image_url")
                return super().redirect_request(req, fp, code, msg, headers, newurl)

        opener = urllib.request.build_opener(_Redirects, urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=self.fetch_timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > self.max_image_bytes:
                    raise ApiError(413, f"{where} is {length} bytes; the limit is {self.max_image_bytes}",
                                   param="image_url")
                data = resp.read(self.max_image_bytes + 1)
        except ApiError:
            raise
        except urllib.error.HTTPError as e:
            raise ApiError(422, f"{where}: fetching {url} failed with HTTP {e.code}", param="image_url") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ApiError(422, f"{where}: fetching {url} failed: {getattr(e, 'reason', e)}", param="image_url") from None
        if len(data) > self.max_image_bytes:
            raise ApiError(413, f"{where} is over the {self.max_image_bytes}-byte limit", param="image_url")
        return data


def _looks_base64(s: str) -> bool:
    return len(s) >= 16 and _B64.fullmatch(s) is not None and not s.startswith(("/", "./", "../"))


def _b64(s: str, where: str) -> bytes:
    try:
        return base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{where}: invalid base64 data", param="image_url") from None


def _data_uri(uri: str, where: str) -> bytes:
    head, sep, payload = uri.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ApiError(422, f"{where}: only base64 data URIs are supported (data:image/png;base64,...)",
                       param="image_url")
    mime = head[len("data:"):-len(";base64")].split(";")[0].strip().lower()
    if mime and not mime.startswith("image/"):
        raise ApiError(422, f"{where}: a data URI of type {mime!r} is not an image", param="image_url")
    return _b64(payload, where)


def markdown_images(text: str) -> tuple[str, list[str]]:
    """TGI's way to put images in `inputs`: `![](data:...)` or `![](https://...)`; returns the text
    without them and the references in order."""
    refs: list[str] = []

    def take(m):
        refs.append(m.group(1))
        return ""

    return re.sub(r"!\[\]\(([^)]*)\)", take, text), refs
