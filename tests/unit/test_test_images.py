"""The offline test images' archive (tests/images/build.py) and the server stand-in's variants:
what update.yml's VM tests rely on."""

import json
import os
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def build(load_script):
    return load_script("test_images_build", os.path.join(ROOT, "tests", "images", "build.py"))


def test_variants_share_the_layers_and_differ_only_in_their_environment(build, tmp_path):
    base, layer = tmp_path / "base.tar", tmp_path / "layer.tar"
    for p in (base, layer):
        with tarfile.open(p, "w"):
            pass
    server = next(i for i in build.IMAGES if i["name"] == "immich-server:standin")
    out = str(tmp_path / "images.tar")
    manifest = build.write_archive(out, str(base), "b" * 64, [(server, str(layer), "d" * 64)])
    tags = [m["RepoTags"][0] for m in manifest]
    assert tags == [build.PREFIX + "immich-server:standin", build.PREFIX + "immich-server:standin-broken",
                    build.PREFIX + "immich-server:standin-next"]
    assert len({tuple(m["Layers"]) for m in manifest}) == 1
    with tarfile.open(out) as arc:
        configs = {m["RepoTags"][0].rsplit(":", 1)[1]: json.load(arc.extractfile(m["Config"]))["config"] for m in manifest}
        assert json.load(arc.extractfile("manifest.json")) == manifest
    env = {tag: c.pop("Env") for tag, c in configs.items()}
    assert configs["standin"] == configs["standin-next"] == configs["standin-broken"]  # the rest is identical
    assert env["standin-next"] == env["standin"] + ["STANDIN_VERSION=3.2.0"]
    assert env["standin-broken"] == env["standin"] + ["STANDIN_NEVER_HEALTHY=1"]


def run_standin(monkeypatch, load_script, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return load_script("standin_server", os.path.join(ROOT, "tests", "images", "standin", "server.py"))


class FakeRequest:
    def __init__(self, handler_cls, path):
        self.handler = handler_cls.__new__(handler_cls)
        self.handler.path = path
        self.sent = []
        self.handler.reply = lambda code, body, ctype="application/json": self.sent.append((code, body))


@pytest.mark.parametrize("env, version, ping", [
    ({}, "3.1.0", 200),
    ({"STANDIN_VERSION": "3.2.0"}, "3.2.0", 200),
    ({"STANDIN_NEVER_HEALTHY": "1"}, "3.1.0", 503),
])
def test_the_server_standin_reports_its_variant(monkeypatch, load_script, env, version, ping):
    monkeypatch.delenv("STANDIN_VERSION", raising=False)
    monkeypatch.delenv("STANDIN_NEVER_HEALTHY", raising=False)
    server = run_standin(monkeypatch, load_script, env)
    server.run_checks = lambda: {"database": {"ok": True, "detail": "stub"}}  # every contract check passes
    req = FakeRequest(server.Handler, "/api/server/version")
    req.handler.do_GET()
    v = req.sent[0][1]
    assert "%d.%d.%d" % (v["major"], v["minor"], v["patch"]) == version
    req = FakeRequest(server.Handler, "/api/server/ping")
    req.handler.do_GET()
    assert req.sent[0][0] == ping
