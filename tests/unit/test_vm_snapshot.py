"""The VM harness's converged image saved running (tests/vm/vm.py snapshot, up --from): the QMP
conversation, the refusal of an image it cannot resume, and a resume that takes the saved guest's
memory, vCPUs and SSH key and hands qemu the saved state."""

import json
import os
import socket
import threading

import pytest


def fake_qemu(path, answers):
    """A QMP server on PATH for one connection: the greeting, then for each command the next of
    ANSWERS (an event first, as qemu may send one at any time). Returns the commands it got."""
    got = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve():
        conn, _address = server.accept()
        f = conn.makefile("rw")
        f.write(json.dumps({"QMP": {"version": {}, "capabilities": []}}) + "\n")
        f.flush()
        for answer in [{"return": {}}] + answers:
            line = f.readline()
            if not line:
                break
            got.append(json.loads(line))
            f.write(json.dumps({"event": "STOP", "timestamp": {}}) + "\n")
            f.write(json.dumps(answer) + "\n")
            f.flush()
        conn.close()
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return got


def test_qmp_negotiates_skips_events_and_returns_each_result(vm, tmp_path):
    got = fake_qemu(str(tmp_path / "qmp.sock"), [{"return": {}}, {"return": {"status": "completed"}}])
    results = vm.qmp({"run_dir": str(tmp_path)}, {"execute": "stop"}, {"execute": "query-migrate"})
    assert results == [{}, {"status": "completed"}]
    assert [c["execute"] for c in got] == ["qmp_capabilities", "stop", "query-migrate"]


def test_a_command_qemu_refuses_says_which_and_why(vm, tmp_path):
    fake_qemu(str(tmp_path / "qmp.sock"), [{"error": {"class": "GenericError", "desc": "VirtFS is mounted"}}])
    with pytest.raises(SystemExit, match="qemu refused migrate: .*VirtFS is mounted"):
        vm.qmp({"run_dir": str(tmp_path)}, {"execute": "migrate", "arguments": {"uri": "exec:cat > x"}})


def test_no_image_and_a_powered_off_image_are_refused_with_what_to_run(vm, tmp_path):
    with pytest.raises(SystemExit, match="no converged image in .*run the scenario that makes it first"):
        vm.read_converged(str(tmp_path))
    (tmp_path / "DONE.json").write_text(json.dumps({"image": "x", "memory": 3072, "shutdown_seconds": 40}))
    with pytest.raises(SystemExit, match="one an older vm.py made: run the scenario that makes it again"):
        vm.read_converged(str(tmp_path))


def saved_image(tmp_path, image, **facts):
    """A converged image as snapshot() leaves it, saved over IMAGE's root.raw (a file made here)."""
    os.makedirs(image, exist_ok=True)
    base = os.path.join(image, "root.raw")
    with open(base, "wb") as f:
        f.write(b"bare image")
    facts.setdefault("base", {"path": base, "size": 10, "mtime_ns": os.stat(base).st_mtime_ns})
    out = tmp_path / "converged"
    out.mkdir()
    for name in ("root.qcow2", "pool.raw", "ram.state"):
        (out / name).write_bytes(b"")
    (out / "id_ed25519").write_text("PRIVATE\n")
    (out / "id_ed25519.pub").write_text("ssh-ed25519 AAAA saved\n")
    (out / "DONE.json").write_text(json.dumps(dict({"image": image, "memory": 2048, "cpus": 1, "shares": {"images": "/x"},
                                                    "private": None, "ram_state_bytes": 0}, **facts)))
    return out


def test_a_resume_takes_the_saved_memory_vcpus_and_key_and_hands_qemu_the_state(vm, monkeypatch, tmp_path):
    image = str(tmp_path / "cache" / "vm" / "abc")
    out = saved_image(tmp_path, image)
    boots, resumes = [], []
    monkeypatch.setattr(vm, "build", lambda: image)
    monkeypatch.setattr(vm, "overlays", lambda state: None)
    monkeypatch.setattr(vm, "boot", lambda state, label, fresh_overlay, incoming=None: boots.append(incoming))
    monkeypatch.setattr(vm, "resumed", lambda state: resumes.append(state["name"]))
    state = vm.up("consumer", memory=3072, cpus=2, converged=str(out))
    assert (state["memory"], state["cpus"], state["shares"]) == (2048, 1, {"images": "/x"})
    assert boots == [str(out / "ram.state")] and resumes == ["consumer"]
    with open(state["identity_file"] + ".pub") as f:
        assert f.read() == "ssh-ed25519 AAAA saved\n"
    assert oct(os.stat(state["identity_file"]).st_mode & 0o777) == oct(os.stat(out / "id_ed25519").st_mode & 0o777)


def test_an_image_saved_over_another_vm_image_is_refused(vm, monkeypatch, tmp_path):
    out = saved_image(tmp_path, str(tmp_path / "elsewhere" / "vm" / "old"))
    monkeypatch.setattr(vm, "build", lambda: str(tmp_path / "cache" / "vm" / "new"))
    with pytest.raises(SystemExit, match="made over another VM image .*make it again"):
        vm.up("consumer", converged=str(out))


def test_an_image_saved_over_a_layer_rebuilt_since_is_refused(vm, monkeypatch, tmp_path):
    """The saved guest's memory holds its file system's state: over a rebuilt layer it would corrupt
    it (seen: an ext4 directory block failing its checksum minutes after the resume)."""
    image = str(tmp_path / "cache" / "vm" / "abc")
    out = saved_image(tmp_path, image)
    monkeypatch.setattr(vm, "build", lambda: image)
    monkeypatch.setattr(vm, "overlays", lambda state: pytest.fail("no disk may be made for a refused resume"))
    base = os.path.join(image, "root.raw")
    saved = os.stat(base).st_mtime_ns
    with open(base, "wb") as f:  # the cache rebuilt: the same path and size, another file
        f.write(b"new image!")
    os.utime(base, ns=(saved + 10**9, saved + 10**9))
    with pytest.raises(SystemExit, match="saved over .*root.raw as it was then; that cached layer was rebuilt"):
        vm.up("consumer", converged=str(out))
    os.unlink(base)
    with pytest.raises(SystemExit, match="that cached layer was rebuilt or removed since"):
        vm.up("consumer", converged=str(out))


def test_a_snapshot_records_the_layer_its_root_is_over(vm, tmp_path):
    image = tmp_path / "vm"
    image.mkdir()
    (image / "root.raw").write_bytes(b"x" * 7)
    layer = tmp_path / "preload.qcow2"
    layer.write_bytes(b"y" * 3)
    assert vm.base_path({"image": str(image), "backing": None}) == str(image / "root.raw")
    assert vm.base_path({"image": str(image), "backing": str(layer)}) == str(layer)
    assert vm.base_identity(str(layer)) == {"path": str(layer), "size": 3, "mtime_ns": os.stat(layer).st_mtime_ns}
    assert vm.base_identity(str(tmp_path / "gone")) is None


def test_a_resume_without_the_devices_the_guest_had_is_refused(vm, monkeypatch, tmp_path):
    image = str(tmp_path / "cache" / "vm" / "abc")
    out = saved_image(tmp_path, image)
    monkeypatch.setattr(vm, "build", lambda: image)
    with pytest.raises(SystemExit, match=r"saved with the shares \['images'\], not \['other'\]"):
        vm.up("consumer", shares={"other": "/y"}, converged=str(out))
