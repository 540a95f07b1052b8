"""Stand-in for the pip bootstrap script (get-pip.py) that ansible-test downloads from a host this
machine cannot reach, to put pip into the empty virtual environments of `ansible-test --venv`.

It does what get-pip.py does: `pip install` the packages given (plus setuptools and wheel unless
--no-setuptools/--no-wheel), running pip from the wheel that the standard library's ensurepip
bundles. Packages come from the configured package index, as for any pip install.
"""

import glob
import os
import sys

import ensurepip

args = sys.argv[1:]
extra = []
for flag, package in (("--no-setuptools", "setuptools"), ("--no-wheel", "wheel")):
    if flag in args:
        args.remove(flag)
    else:
        extra.append(package)
wheels = glob.glob(os.path.join(os.path.dirname(ensurepip.__file__), "_bundled", "pip-*.whl"))
if not wheels:
    sys.exit("get_pip_offline: no pip wheel bundled with this Python's ensurepip")
sys.path.insert(0, wheels[0])
from pip._internal.cli.main import main  # noqa: E402  (the path above makes it importable)

sys.exit(main(["install", "--upgrade"] + args + extra))
