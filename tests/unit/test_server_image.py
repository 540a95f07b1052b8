"""The real Immich server's test images built from upstream's source (tests/images/server.py): the
toolchain it picks, the source it finds or refuses, the geodata it generates in the formats the
server reads, what it strips, and the cache keys that decide when Immich is built again."""

import json
import os
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture()
def server(load_script, monkeypatch, tmp_path):
    module = load_script("test_server_image_build", os.path.join(ROOT, "tests", "images", "server.py"))
    monkeypatch.setattr(module, "UPSTREAM", str(tmp_path / "upstream"))
    monkeypatch.setattr(module, "CACHE", str(tmp_path / "cache"))
    (tmp_path / "upstream").mkdir()
    return module


def test_the_toolchain_is_the_one_upstream_pins(server):
    mise = '[monorepo]\nconfig_roots = ["server"]\n\n[tools]\nnode = "24.15.0"\npnpm = "11.13.1"\n' \
           '"github:extism/cli" = "1.6.3"\n\n[tools."github:jellyfin/jellyfin-ffmpeg"]\nversion = "7.1.3-6"\n'
    assert server.pinned_tools(mise) == ("24.15.0", "11.13.1")
    with pytest.raises(SystemExit, match="pins no 'pnpm' version"):
        server.pinned_tools('[tools]\nnode = "24.15.0"\n[other]\npnpm = "1"\n')


def test_sources_are_found_by_name_and_a_missing_version_says_where_it_looked(server, tmp_path):
    for name in ("immich-v3.1.0-src.tar.gz", "immich-v3.0.3-src.tar.gz", "README.md", "immich-latest-src.tar.gz"):
        (tmp_path / "upstream" / name).write_bytes(b"x")
    assert sorted(server.sources()) == ["3.0.3", "3.1.0"]
    with pytest.raises(SystemExit, match=r"no upstream source for Immich v2\.0\.0 in .*upstream .*There: 3\.0\.3, 3\.1\.0"):
        server.source_for("2.0.0")


def test_immich_is_built_again_only_when_its_source_or_recipe_changes(server, monkeypatch, tmp_path):
    source = tmp_path / "upstream" / "immich-v3.1.0-src.tar.gz"
    source.write_bytes(b"release")
    app, archive = server.app_key("3.1.0"), server.archive_path("3.1.0")
    assert archive.startswith(str(tmp_path / "cache" / "server")) and archive.endswith("immich-server-v3.1.0.tar")
    # another build.py (the image helpers): a new archive, the same application layer
    helpers = tmp_path / "build.py"
    helpers.write_text("# changed\n")
    monkeypatch.setattr(server, "HERE", str(tmp_path))
    assert server.app_key("3.1.0") == app and server.archive_path("3.1.0") != archive
    # other generated geodata (part of the application's recipe): a new application layer
    monkeypatch.setattr(server, "CITIES", server.CITIES[:1])
    assert server.app_key("3.1.0") != app
    monkeypatch.undo()
    monkeypatch.setattr(server, "UPSTREAM", str(tmp_path / "upstream"))
    monkeypatch.setattr(server, "CACHE", str(tmp_path / "cache"))
    assert server.app_key("3.1.0") == app
    # another source: both new
    source.write_bytes(b"another release")
    assert server.app_key("3.1.0") != app


def test_geodata_has_every_file_the_server_reads_in_its_columns(server, tmp_path):
    server.write_geodata(str(tmp_path / "geodata"))
    files = sorted(os.listdir(tmp_path / "geodata"))
    assert files == ["admin1CodesASCII.txt", "admin2Codes.txt", "cities500.txt", "geodata-date.txt",
                     "ne_10m_admin_0_countries.geojson"]
    admin1 = dict(line.split("\t")[:2] for line in (tmp_path / "geodata" / "admin1CodesASCII.txt").read_text().splitlines())
    admin2 = dict(line.split("\t")[:2] for line in (tmp_path / "geodata" / "admin2Codes.txt").read_text().splitlines())
    rows = [line.split("\t") for line in (tmp_path / "geodata" / "cities500.txt").read_text().splitlines()]
    assert all(len(r) == 19 for r in rows)
    # the columns the server's import reads (map.repository.ts: 0 id, 1 name, 4/5 position, 7 feature
    # code, 8 country, 10/11 admin codes, 18 modification date), and no row it skips (PPLX, PPLH)
    berlin = next(r for r in rows if r[1] == "Berlin")
    assert (int(berlin[0]), float(berlin[4]), float(berlin[5]), berlin[8]) == (2950159, 52.52437, 13.41053, "DE")
    assert admin1["%s.%s" % (berlin[8], berlin[10])] == "Land Berlin"
    assert admin2["%s.%s.%s" % (berlin[8], berlin[10], berlin[11])] == "Berlin, Stadt"
    assert not [r for r in rows if r[7] in ("PPLX", "PPLH")] and all(r[18] for r in rows)
    countries = json.loads((tmp_path / "geodata" / "ne_10m_admin_0_countries.geojson").read_text())
    assert countries["type"] == "FeatureCollection" and countries["features"]
    for feature in countries["features"]:
        assert {"ADMIN", "ADM0_A3", "TYPE"} <= set(feature["properties"])
        assert feature["geometry"]["type"] == "Polygon"
    assert (tmp_path / "geodata" / "geodata-date.txt").read_text().strip()


def test_source_maps_and_declarations_go_and_code_stays(server, tmp_path):
    app = tmp_path / "server"
    (app / "dist").mkdir(parents=True)
    keep = ["dist/main.js", "dist/main.mjs", "dist/tool.cjs", "package.json", "dist/index.ts"]
    gone = ["dist/main.js.map", "dist/main.d.ts", "dist/x.d.mts", "dist/y.d.cts"]
    for rel in keep + gone:
        (app / rel).write_text("12345")
    assert server.slim_app(str(app)) == 5 * len(gone)
    assert sorted(str(p.relative_to(app)) for p in app.rglob("*") if p.is_file()) == sorted(keep)


def test_the_image_keeps_upstreams_contract(server):
    """server/Dockerfile's final stage: what a quadlet, a health check and an admin rely on."""
    config = server.CONFIG
    assert config["Entrypoint"] == ["tini", "--", "/bin/bash", "-c"] and config["Cmd"] == ["start.sh"]
    assert config["WorkingDir"] == "/usr/src/app" and "/data" in config["Volumes"]
    assert "2283/tcp" in config["ExposedPorts"]
    assert config["Healthcheck"]["Test"] == ["CMD-SHELL", "immich-healthcheck"]
    path = next(e for e in config["Env"] if e.startswith("PATH="))
    assert path.endswith(":/usr/src/app/server/bin") and "NODE_ENV=production" in config["Env"]
    assert "User" not in config  # upstream's runs as root
    assert {"tini", "curl", "ffmpeg", "perl"} <= set(server.RUNTIME_PACKAGES)
    assert not [p for p in server.RUNTIME_PACKAGES if "mimalloc" in p]


def test_an_archive_stores_a_shared_layer_once(load_script, tmp_path):
    build = load_script("test_server_image_helpers", os.path.join(ROOT, "tests", "images", "build.py"))
    tars = {}
    for name in ("base", "a", "b"):
        tars[name] = str(tmp_path / ("%s.tar" % name))
        with tarfile.open(tars[name], "w"):
            pass
    out = str(tmp_path / "out.tar")
    manifest = build.write_image_archive(out, [
        {"tag": "one:1", "config": {"Env": []}, "layers": [(tars["base"], "0" * 64), (tars["a"], "a" * 64)],
         "history": ["base", "a"]},
        {"tag": "two:2", "config": {"Env": []}, "layers": [(tars["base"], "0" * 64), (tars["b"], "b" * 64)],
         "history": ["base", "b"]}])
    with tarfile.open(out) as arc:
        names = arc.getnames()
        assert names.count("0" * 64 + ".tar") == 1
        config = json.load(arc.extractfile(manifest[1]["Config"]))
    assert [m["RepoTags"] for m in manifest] == [[build.PREFIX + "one:1"], [build.PREFIX + "two:2"]]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + "0" * 64, "sha256:" + "b" * 64]
    assert [h["created_by"] for h in config["history"]] == ["base", "b"]
