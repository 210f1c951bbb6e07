"""``diffusionreg models list|pull|import|verify`` against a real HTTP server on 127.0.0.1, and
models given by path verified as if given by name."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from diffusionreg import cli, models, registry
from diffusionreg.errors import InputError

PAYLOAD = os.urandom(3 * 2**20 + 12345)  # a few MiB of "weights": several progress units
CUT = 2**20 + 123  # bytes the server sends before dropping the first connection


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files`` with HTTP Range support; can cut the first answer short or ignore ranges."""

    def do_GET(self):
        server = self.server
        data = server.files.get(self.path)
        server.requests.append((self.path, self.headers.get("Range")))
        if data is None:
            self.send_error(404)
            return
        start, wanted = 0, self.headers.get("Range")
        if wanted and not server.ignore_range:
            start = int(wanted.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after is not None:
            body, server.cut_after = body[: server.cut_after], None
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.cut_after, httpd.ignore_range = {}, [], None, False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def setup(tmp_path, monkeypatch, server):
    """A registry with downloadable entries, the user models folder in tmp_path."""
    root = tmp_path / "Resources"
    (root / "Models" / "big").mkdir(parents=True)
    (root / "Models" / "big" / "config.json").write_text("{}")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    server.files["/big.safetensors"] = PAYLOAD
    server.files["/evil.safetensors"] = PAYLOAD[::-1]
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    common = {"modality": "mri", "config": "Models/big/config.json"}
    registry.write_records(
        root / "Models.json",
        [
            {
                "name": "big",
                "task": "deformable",
                "url": f"{base}/big.safetensors",
                "size": len(PAYLOAD),
                "sha256": sha,
                **common,
            },
            {"name": "evil", "task": "affine", "url": f"{base}/evil.safetensors", "sha256": sha, **common},
            {
                "name": "offline",
                "task": "affine",
                "url": f"{base}/not-served.safetensors",
                "sha256": hashlib.sha256(b"offline weights").hexdigest(),
                **common,
            },
        ],
    )
    monkeypatch.setenv(registry.REGISTRY_ENV, str(root / "Models.json"))
    monkeypatch.setenv(registry.MODELS_DIR_ENV, str(tmp_path / "user"))
    return tmp_path


def _run(*args):
    return cli.main(["models", *args, "--progress", "none"])


def _states(capsys):
    capsys.readouterr()
    assert _run("list", "--json") == 0
    return {(d["name"], d["task"]): d["state"] for d in map(json.loads, capsys.readouterr().out.splitlines())}


def test_pull_resumes_after_a_dropped_connection(setup, server, capsys):
    assert _states(capsys)[("big", "deformable")] == "downloadable"
    target = setup / "user" / "cache" / "deformable" / "big" / "big.safetensors"
    part = target.with_name(target.name + ".part")

    server.cut_after = CUT
    assert _run("pull", "big") == 2
    err = capsys.readouterr().err.strip()
    assert "run the same command again to resume" in err and "\n" not in err
    assert not target.exists() and part.stat().st_size == CUT, "nothing unverified is kept as the model"

    assert cli.main(["models", "pull", "big", "--progress", "json"]) == 0
    assert server.requests[-1] == ("/big.safetensors", f"bytes={CUT}-"), "the second request resumes"
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    download = [line for line in lines if line["stage"] == "download"]
    assert download[-1]["fraction"] == 1.0 and any(0 < line["fraction"] < 1 for line in download)
    assert target.read_bytes() == PAYLOAD and not part.exists()
    assert _states(capsys)[("big", "deformable")] == "installed"
    assert models.resolve("big", "deformable").file == target
    count = len(server.requests)
    assert _run("pull", "big") == 0 and len(server.requests) == count, "an installed model is not fetched again"


def test_a_server_that_ignores_the_range_restarts_the_part(setup, server):
    target = setup / "user" / "cache" / "deformable" / "big" / "big.safetensors"
    target.parent.mkdir(parents=True)
    target.with_name(target.name + ".part").write_bytes(b"stale bytes of another file")
    server.ignore_range = True
    assert _run("pull", "big") == 0
    assert target.read_bytes() == PAYLOAD


def test_checksum_mismatch_is_refused_and_nothing_kept(setup, capsys):
    assert _run("pull", "evil") == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and err.count("\n") == 1
    folder = setup / "user" / "cache" / "affine" / "evil"
    assert not any(folder.iterdir()), "neither the model nor a part is left"
    assert _states(capsys)[("evil", "affine")] == "downloadable"


def test_offline_import_verifies_against_the_registry(setup, capsys, tmp_path):
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    good.write_bytes(b"offline weights")
    bad.write_bytes(b"something else")
    assert _run("import", str(bad)) == 2
    assert "matches no registry entry" in capsys.readouterr().err
    assert _run("import", str(good)) == 0
    installed = setup / "user" / "cache" / "affine" / "offline" / "not-served.safetensors"
    assert installed.read_bytes() == b"offline weights" and good.read_bytes() == b"offline weights"
    assert _states(capsys)[("offline", "affine")] == "installed"
    assert _run("verify") == 0
    installed.write_bytes(b"tampered")
    capsys.readouterr()
    assert _run("verify", "offline") == 2
    captured = capsys.readouterr()
    assert "CHECKSUM MISMATCH" in captured.out and "failed verification" in captured.err


def test_unknown_model_and_missing_file_are_one_line(setup, capsys, tmp_path):
    assert _run("pull", "nope") == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert _run("import", str(tmp_path / "absent.safetensors")) == 2
    assert "model file not found" in capsys.readouterr().err
    with pytest.raises(InputError, match="not downloaded yet: run 'diffusionreg models pull big'"):
        models.load_state_dict(models.resolve("big", "deformable"))


def test_slicer_side_sees_installed_and_downloadable(setup, server, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "DiffusionRegCore"))
    from DiffusionRegCoreLib import models as slicer_models
    from DiffusionRegCoreLib import paths

    manager = slicer_models.ModelManager(paths.modelsRegistryPath(), paths.userModelsDir())
    assert {e.name: e.state for e in manager.models()} == {
        "big": "downloadable",
        "evil": "downloadable",
        "offline": "downloadable",
    }
    assert manager.find("big").label() == "big (download)"
    assert _run("pull", "big") == 0
    big = manager.find("big")
    assert big.state == "installed" and manager.verify(big).status == "ok" and big.modelArgument() == "big"


def test_slicer_side_reads_the_registration_defaults_of_the_shipped_models(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "DiffusionRegCore"))
    from diffusionreg.affine.register import load_model
    from DiffusionRegCoreLib import models as slicer_models
    from DiffusionRegCoreLib import paths

    manager = slicer_models.ModelManager(paths.modelsRegistryPath(), paths.userModelsDir())
    shown = manager.inferenceDefaults(manager.find("brain-mri", task="affine"))
    backend = load_model("brain-mri").cfg.inference
    assert (shown["steps"], shown["bidirectional"], shown["initialize"]) == (
        backend.steps,
        backend.bidirectional,
        backend.initialize,
    )
    assert len(shown["refine"]["levels"]) == len(backend.refine.levels)
    assert manager.inferenceDefaults(slicer_models.ModelEntry("x", "affine")) == {}


# --- a registered model given by path is verified as if given by name (issue 9 item 15) -----------------
def _registered(tmp_path, sha):
    folder = tmp_path / "Models" / "m"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    registry.write_records(
        tmp_path / "Models.json",
        [
            {
                "name": "m",
                "task": "affine",
                "modality": "mri",
                "file": "Models/m/model.safetensors",
                "sha256": sha,
                "config": "Models/m/config.json",
            }
        ],
    )
    return folder


@pytest.mark.parametrize("given", ["folder", "file"])
def test_a_registered_models_path_is_verified(tmp_path, given, capsys):
    folder = _registered(tmp_path, "0" * 64)  # the registry says other bytes: a tampered file
    path = folder if given == "folder" else folder / "model.safetensors"
    entry = models.resolve(str(path), "affine", registry_path=tmp_path / "Models.json")
    assert entry.name == "m" and entry.sha256 == "0" * 64
    with pytest.raises(InputError, match="sha256 mismatch"):
        models.verify(entry)
    assert "unverified" not in capsys.readouterr().err


def test_an_unregistered_path_says_it_is_unverified(tmp_path, capsys):
    _registered(tmp_path, hashlib.sha256(b"weights").hexdigest())
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"weights")  # same bytes, but not the registered file
    entry = models.resolve(str(other), "affine", registry_path=tmp_path / "Models.json")
    models.verify(entry)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "unverified model file (no registry entry)" in err[0]
