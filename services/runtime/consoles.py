"""The web console of each service, served by the service itself at /ui.

    GET /ui          services/consoles/<service>.html
    GET /ui/<file>   the console's scripts and styles (services/consoles/*.js, *.css)

Plain static files: no build step, nothing fetched from the internet, and the page calls only
the service that served it (same origin, so no CORS and no ALLOWED_ORIGINS needed). The files
are read once, at start; the Content-Security-Policy lets the page load nothing else.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent.parent / "consoles"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}
# Images the page draws come from the service as data: or blob: URLs; the webcam is a blob.
POLICY = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
          b"media-src 'self' blob:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = [(b"content-security-policy", POLICY), (b"x-content-type-options", b"nosniff"),
           (b"cache-control", b"no-cache")]


class Consoles:
    def __init__(self, service: str, folder: Path = FOLDER):
        self.files: dict[str, tuple[bytes, str]] = {}
        if not folder.is_dir():
            return
        for path in folder.iterdir():
            if path.suffix in TYPES and (path.suffix != ".html" or path.stem == service):
                self.files[path.name] = (path.read_bytes(), TYPES[path.suffix])
        page = self.files.get(f"{service}.html")
        if page is not None:
            self.files[""] = page

    def get(self, path: str) -> tuple[bytes, str] | None:
        """The file for a GET path (/ui, /ui/name.js), or None."""
        if path == "/ui":
            return self.files.get("")
        if path.startswith("/ui/"):
            return self.files.get(path[4:])
        return None
