"""A local stand-in for the few Hugging Face Hub endpoints ``HfApi.create_repo`` and ``HfApi.upload_folder`` call.

The Hub cannot be reached from the test machines, so tests point a real ``huggingface_hub.HfApi`` at this
server (``HfApi(endpoint=hub.url)``) and read back what was committed. Endpoints:

- ``POST /api/repos/create``: records the repo (409 when it exists, which ``exist_ok=True`` accepts);
- ``POST /api/validate-yaml``: parses the card's YAML front matter (400 with the error when it does not parse);
- ``POST /api/{type}s/{ns}/{name}/preupload/{rev}``: every file ``regular`` (see below), none ignored;
- ``POST /api/{type}s/{ns}/{name}/commit/{rev}``: the NDJSON commit; each file's base64 content is stored.

Where it departs from the Hub: every file is declared a regular git blob, so its bytes travel inline in the
commit and the test can compare them with the staged folder; the real Hub sends large and binary files
(weights, parquet) through Xet/LFS storage instead, a transfer this stand-in does not implement. Every request
must carry ``Authorization: Bearer <token>`` (401 otherwise); the tokens seen are recorded.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

_REPO_PATH = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/(preupload|commit)/([^/?]+)")


class HubStandIn:
    """``with HubStandIn() as hub:`` a server on 127.0.0.1; ``hub.repos`` = {(type, id): {path: bytes}}."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}
        self.private: dict[tuple[str, str], bool] = {}
        self.commits: list[dict] = []
        self.tokens: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.validated: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                hub.requests.append(("POST", path))
                auth = self.headers.get("Authorization", "")
                if not auth.startswith("Bearer "):
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                hub.tokens.add(auth.removeprefix("Bearer "))
                if path == "/api/repos/create":
                    return self._create(json.loads(body))
                if path == "/api/validate-yaml":
                    return self._validate(json.loads(body))
                m = _REPO_PATH.match(path)
                if not m:
                    return self._reply(404, {"error": f"stand-in: no endpoint {path}"})
                kind, repo_id, what, _rev = m.groups()
                key = (kind[:-1], repo_id)
                if key not in hub.repos:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if what == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                         "oid": None} for f in files]})
                return self._commit(key, body)

            def _create(self, p: dict) -> None:
                kind = p.get("type") or "model"
                key = (kind, f"{p['organization']}/{p['name']}" if p.get("organization") else p["name"])
                if key in hub.repos:
                    return self._reply(409, {"error": "You already created this repo", "url": f"{hub.url}/{key[1]}"})
                hub.repos[key] = {}
                hub.private[key] = p.get("visibility") == "private" or bool(p.get("private"))
                prefix = "" if kind == "model" else f"{kind}s/"
                return self._reply(200, {"url": f"{hub.url}/{prefix}{key[1]}"})

            def _validate(self, p: dict) -> None:
                text = p["content"]
                hub.validated.append(p.get("repoType") or "model")
                if text.startswith("---\n"):
                    try:
                        yaml.safe_load(text[4:].split("\n---\n", 1)[0])
                    except yaml.YAMLError as e:
                        return self._reply(400, {"errors": [{"message": str(e)}]})
                return self._reply(200, {"warnings": []})

            def _commit(self, key: tuple[str, str], body: bytes) -> None:
                lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                files = {}
                for x in lines:
                    if x["key"] == "file":
                        v = x["value"]
                        files[v["path"]] = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                    elif x["key"] != "header":
                        return self._reply(400, {"error": f"stand-in: {x['key']} operations are not implemented"})
                hub.repos[key].update(files)
                hub.commits.append({"repo": key, "summary": header.get("summary"), "files": sorted(files)})
                oid = f"{len(hub.commits):040x}"
                prefix = "" if key[0] == "model" else f"{key[0]}s/"
                return self._reply(200, {"commitUrl": f"{hub.url}/{prefix}{key[1]}/commit/{oid}", "commitOid": oid,
                                         "pullRequestUrl": None})

        return Handler
