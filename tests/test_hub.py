"""`hybridize push` (the model card it writes is in tests/test_model_card.py).

The uploads here go to a local HTTP server on 127.0.0.1 standing in for the Hugging Face Hub (`FakeHub` below), not
to the real Hub: this machine cannot reach it. The fake implements only the endpoints huggingface_hub's
`create_repo`, `create_branch` and `upload_folder` call (repo creation, README metadata validation, preupload, the
LFS batch API with basic and multipart transfers, and the NDJSON commit), and keeps what was committed so the tests
can compare it byte for byte with the model directory. huggingface_hub uploads large files through Xet when `hf_xet`
is installed; Xet's chunk store is not faked, so these tests switch Xet off and exercise the library's LFS path.
"""

import base64
import hashlib
import json
import logging
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub
import pytest
from huggingface_hub import ModelCard
from tiny import run_cli

from hybridize.errors import CheckpointError, ConfigError
from hybridize.hub import PushConfig, push
from hybridize.model_card import model_card

TOKEN = "hf_fakeTokenForTheLocalHub0123456789"


class FakeHub:
    """The subset of the Hub's HTTP API that `create_repo`, `create_branch` and `upload_folder` use.

    `lfs_mode` is the LFS transfer the batch endpoint answers with: `"basic"` (one PUT) or `"multipart"` (parts
    PUT to separate URLs, then a completion POST). `*.safetensors` files are LFS, as on the Hub.
    """

    def __init__(self, lfs_mode: str = "basic", chunk_size: int = 200_000):
        self.lfs_mode, self.chunk_size = lfs_mode, chunk_size
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.unexpected: list[str] = []
        self.objects: dict[str, bytes] = {}  # LFS store, by sha256
        self.parts: dict[tuple[str, int], bytes] = {}
        self.lfs_paths: set[str] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload: dict | None = None, headers: dict | None = None):
                body = json.dumps(payload if payload is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                self._route("PUT")

            def do_POST(self):
                self._route("POST")

            def do_GET(self):
                self._route("GET")

            def _route(self, method: str):
                path = self.path.split("?")[0]
                auth = self.headers.get("Authorization")
                hub.requests.append((method, path, auth))
                body = self._body()
                storage = path.startswith("/_lfs/")  # presigned storage URLs carry no token, like S3's
                if not storage and auth != f"Bearer {TOKEN}":
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                for pattern, handler in ROUTES:
                    if match := re.fullmatch(pattern, f"{method} {path}"):
                        return handler(self, body, **match.groupdict())
                hub.unexpected.append(f"{method} {path}")
                self._send(404, {"error": f"fake hub: no route for {method} {path}"})

            # /api/repos/create: 409 when it exists, as on the Hub (create_repo(exist_ok=True) accepts it)
            def create_repo(self, body):
                payload = json.loads(body)
                repo_id = f"{payload['organization']}/{payload['name']}"
                url = f"{hub.url}/{repo_id}"
                if repo_id in hub.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": url})
                hub.repos[repo_id] = {"private": payload.get("visibility") == "private", "branches": {"main": {}}}
                self._send(200, {"url": url})

            def validate_yaml(self, body):
                try:
                    ModelCard(json.loads(body)["content"])
                except Exception as error:  # noqa: BLE001 - whatever fails to parse is invalid metadata
                    return self._send(400, {"errors": [{"message": str(error)}]})
                self._send(200, {"errors": [], "warnings": []})

            def create_branch(self, body, repo, branch):
                branches = hub.repos[repo]["branches"]
                if branch in branches:
                    return self._send(409, {"error": "Reference already exists"})
                branches[branch] = dict(branches["main"])
                self._send(200, {})

            def preupload(self, body, repo, revision):
                if repo not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                files = [
                    {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular"}
                    for f in json.loads(body)["files"]
                ]
                files = [{**f, "shouldIgnore": False, "oid": None} for f in files]
                self._send(200, {"files": files})

            def lfs_batch(self, body, repo):
                objects = []
                for obj in json.loads(body)["objects"]:
                    oid, size = obj["oid"], obj["size"]
                    if hub.lfs_mode == "multipart":
                        count = math.ceil(size / hub.chunk_size)
                        parts = {str(n): f"{hub.url}/_lfs/{oid}/{n}" for n in range(1, count + 1)}
                        header = {"chunk_size": str(hub.chunk_size), **parts}
                        upload = {"href": f"{hub.url}/_lfs/{oid}/complete", "header": header}
                    else:
                        upload = {"href": f"{hub.url}/_lfs/{oid}"}
                    actions = {"upload": upload, "verify": {"href": f"{hub.url}/api/lfs-verify"}}
                    objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
                self._send(200, {"transfer": hub.lfs_mode, "objects": objects})

            def lfs_put(self, body, oid):
                hub.objects[oid] = body
                self._send(200, {})

            def lfs_part(self, body, oid, part):
                hub.parts[(oid, int(part))] = body
                self._send(200, {}, {"ETag": hashlib.md5(body).hexdigest()})

            def lfs_complete(self, body, oid):
                parts = json.loads(body)["parts"]
                hub.objects[oid] = b"".join(hub.parts[(oid, p["partNumber"])] for p in parts)
                self._send(200, {})

            def lfs_verify(self, body):
                oid = json.loads(body)["oid"]
                ok = oid in hub.objects and hashlib.sha256(hub.objects[oid]).hexdigest() == oid
                self._send(200 if ok else 404, {} if ok else {"error": "object not found"})

            def commit(self, body, repo, revision):
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header, operations = lines[0], lines[1:]
                assert header["key"] == "header"
                files = hub.repos[repo]["branches"].setdefault(revision, {})
                for op in operations:
                    value = op["value"]
                    if op["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif op["key"] == "lfsFile":
                        files[value["path"]] = hub.objects[value["oid"]]
                        hub.lfs_paths.add(value["path"])
                    else:
                        raise AssertionError(f"unexpected commit operation {op['key']}")
                oid = hashlib.sha1(body).hexdigest()
                hub.commits.append({"repo": repo, "revision": revision, "summary": header["value"]["summary"]})
                self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})

        repo = r"(?P<repo>[\w.-]+/[\w.-]+)"
        ROUTES = [
            (r"POST /api/repos/create", Handler.create_repo),
            (r"POST /api/validate-yaml", Handler.validate_yaml),
            (rf"POST /api/models/{repo}/branch/(?P<branch>[^/]+)", Handler.create_branch),
            (rf"POST /api/models/{repo}/preupload/(?P<revision>[^/]+)", Handler.preupload),
            (rf"POST /{repo}\.git/info/lfs/objects/batch", Handler.lfs_batch),
            (r"PUT /_lfs/(?P<oid>[0-9a-f]{64})", Handler.lfs_put),
            (r"PUT /_lfs/(?P<oid>[0-9a-f]{64})/(?P<part>\d+)", Handler.lfs_part),
            (r"POST /_lfs/(?P<oid>[0-9a-f]{64})/complete", Handler.lfs_complete),
            (r"POST /api/lfs-verify", Handler.lfs_verify),
            (rf"POST /api/models/{repo}/commit/(?P<revision>[^/]+)", Handler.commit),
        ]
        return Handler


@pytest.fixture
def fake_hub(request, monkeypatch):
    hub = FakeHub(**getattr(request, "param", {}))
    thread = threading.Thread(target=hub.server.serve_forever, daemon=True)
    thread.start()
    # Xet's chunk store is not faked (see the module docstring); offline mode would block even a local endpoint.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    yield hub
    hub.server.shutdown()
    hub.server.server_close()
    thread.join()


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No token anywhere huggingface_hub looks: environment, OIDC, login cache."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def _digest(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# push against the local stand-in for the Hub


@pytest.mark.parametrize("fake_hub", [{"lfs_mode": "basic"}, {"lfs_mode": "multipart"}], indirect=True)
def test_push_uploads_every_file(fake_hub, hybrid_dir, no_token, caplog):
    before = _digest(hybrid_dir)
    with caplog.at_level(logging.DEBUG):
        url = push(hybrid_dir, PushConfig(repo_id="someone/tiny-mamba50", endpoint=fake_hub.url), token=TOKEN)
    assert "uploading" in caplog.text and TOKEN not in caplog.text
    assert url == f"{fake_hub.url}/someone/tiny-mamba50"
    uploaded = fake_hub.files("someone/tiny-mamba50")
    assert {k: v for k, v in uploaded.items() if k != "README.md"} == before  # every file, identical bytes
    assert _digest(hybrid_dir) == before  # the input directory is untouched
    assert fake_hub.lfs_paths == {"model.safetensors"}  # the weights went through the LFS protocol
    if fake_hub.lfs_mode == "multipart":
        assert len([key for key in fake_hub.parts if key[1] > 1]) >= 2
    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.tags == ["hybridize", "hybrid", "mamba2"] and card.data.library_name == "transformers"
    assert card.text == model_card(hybrid_dir, repo_id="someone/tiny-mamba50").text
    api_calls = [(m, p, a) for m, p, a in fake_hub.requests if not p.startswith("/_lfs/")]
    assert api_calls and all(auth == f"Bearer {TOKEN}" for _, _, auth in api_calls)
    assert ("POST", "/api/validate-yaml", f"Bearer {TOKEN}") in fake_hub.requests
    assert not fake_hub.unexpected
    assert not fake_hub.repos["someone/tiny-mamba50"]["private"]
    assert fake_hub.commits[-1]["summary"] == "Upload tiny-mamba50 with hybridize"


def test_push_cli(fake_hub, hybrid_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    args = ("push", hybrid_dir, "someone/tiny-mamba50", "--private", "--revision", "dev", "--message", "first cut")
    code, out = run_cli(*args)
    assert code == 0, out
    assert f"{fake_hub.url}/someone/tiny-mamba50/tree/dev" in out.splitlines()
    assert TOKEN not in out
    repo = fake_hub.repos["someone/tiny-mamba50"]
    assert repo["private"] and set(repo["branches"]) == {"main", "dev"}
    assert "model.safetensors" in repo["branches"]["dev"] and not repo["branches"]["main"]
    assert fake_hub.commits[-1] == {"repo": "someone/tiny-mamba50", "revision": "dev", "summary": "first cut"}
    assert all(TOKEN.encode() not in data for data in repo["branches"]["dev"].values())

    # a second push to the existing repository and branch updates it (create_repo and create_branch answer 409)
    code, out = run_cli(*args)
    assert code == 0, out
    assert len(fake_hub.commits) == 2 and not fake_hub.unexpected


def test_push_keeps_the_directory_readme(fake_hub, hybrid_dir, no_token):
    own = "---\nlicense: mit\n---\n\n# My own card\n"
    (hybrid_dir / "README.md").write_text(own)
    push(hybrid_dir, PushConfig(repo_id="someone/mine"), token=TOKEN)  # endpoint from HF_ENDPOINT
    assert fake_hub.files("someone/mine")["README.md"].decode() == own


def test_invalid_readme_in_the_directory(fake_hub, hybrid_dir, no_token):
    (hybrid_dir / "README.md").write_text("---\n- not\n- a mapping\n---\n\n# Card\n")
    with pytest.raises(ConfigError, match="rejected the metadata of .*README.md.*remove the file"):
        push(hybrid_dir, PushConfig(repo_id="someone/mine"), token=TOKEN)
    assert not [path for _, path, _ in fake_hub.requests if "/commit/" in path or "/preupload/" in path]


def test_token_refused(fake_hub, hybrid_dir, no_token):
    wrong = "hf_wrongToken000000000000000000000"
    with pytest.raises(ConfigError, match="refused the token.*hf auth login") as error:
        push(hybrid_dir, PushConfig(repo_id="someone/tiny-mamba50"), token=wrong)
    assert wrong not in str(error.value)


# Errors, through the CLI: each stops before any request reaches the Hub


def test_missing_token(fake_hub, hybrid_dir, no_token):
    code, out = run_cli("push", hybrid_dir, "someone/tiny-mamba50")
    assert code == 1 and "no Hugging Face token" in out and "hf auth login" in out and "HF_TOKEN" in out
    assert not fake_hub.requests


@pytest.mark.parametrize("repo_id", ["tiny-mamba50", "some one/tiny", "a/b/c", "someone/-bad--name-", "someone/"])
def test_bad_repo_id(fake_hub, hybrid_dir, monkeypatch, repo_id):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, out = run_cli("push", hybrid_dir, repo_id)
    assert code == 1 and f"repo id {repo_id!r} is not valid" in out and "owner/name" in out
    assert not fake_hub.requests


@pytest.mark.parametrize("what", ["missing", "empty", "file", "no weights", "corrupt weights"])
def test_not_a_model_directory(fake_hub, hybrid_dir, tmp_path, monkeypatch, what):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    target = {"missing": tmp_path / "nowhere", "empty": tmp_path / "empty", "file": hybrid_dir / "config.json"}.get(
        what, hybrid_dir
    )
    if what == "empty":
        target.mkdir()
    elif what == "no weights":
        (hybrid_dir / "model.safetensors").unlink()
    elif what == "corrupt weights":
        weights = hybrid_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    code, out = run_cli("push", target, "someone/tiny-mamba50")
    expected = {
        "missing": "not a directory",
        "empty": "config.json",
        "file": "not a directory",
        "no weights": "safetensors",
        "corrupt weights": "model.safetensors",
    }[what]
    assert code == 1 and expected in out, out
    assert not fake_hub.requests


def test_push_config_errors():
    with pytest.raises(ConfigError, match="revision"):
        PushConfig(repo_id="someone/x", revision=" ")
    with pytest.raises(ConfigError, match="commit_message"):
        PushConfig(repo_id="someone/x", commit_message="")
    with pytest.raises(ConfigError, match="endpoint"):
        PushConfig(repo_id="someone/x", endpoint="localhost:8000")
    with pytest.raises(CheckpointError, match="not a directory"):
        push("/nonexistent/model", PushConfig(repo_id="someone/x"), token=TOKEN)
