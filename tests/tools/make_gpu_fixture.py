"""Write a fixture GPU tree (AMD discrete gfx1030 with /dev/kfd) as a tar archive, for the rocm scenario.

    make_gpu_fixture.py OUT.tar

Built with the same builder as the gpu_facts fixture tests (tests/integration/gpu_tree.py); device
nodes are files with the real modes and numeric groups (video 44, render 992). Needs root (chown).
"""

import os
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integration"))

from gpu_tree import CPU_NODE, Tree, gpu_node  # noqa: E402


def main(out):
    with tempfile.TemporaryDirectory() as tmp:
        tree = Tree(os.path.join(tmp, "root"), users={})
        tree.pci_gpu("0000:03:00.0", "0x1002", "0x73bf", "amdgpu", card=0, render=128, vram=17163091968)
        tree.module("amdgpu")
        tree.kfd([CPU_NODE, gpu_node(100300, 4098, 0x73bf, 128)])
        with tarfile.open(out, "w") as tar:
            tar.add(tree.root, arcname=".")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
