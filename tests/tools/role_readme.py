"""Render each role's variables table from meta/argument_specs.yml into its README.md.

    role_readme.py [--check]

The table goes between <!-- BEGIN VARIABLES --> and <!-- END VARIABLES -->; with --check,
exit 1 (naming the roles) when a README is not current.
"""

import os
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BEGIN, END = "<!-- BEGIN VARIABLES -->", "<!-- END VARIABLES -->"


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(spec):
    rows = ["| Variable | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for name, opt in spec.get("options", {}).items():
        kind = opt.get("type", "str")
        if opt.get("elements"):
            kind += " of " + opt["elements"]
        if opt.get("choices"):
            kind += " (" + ", ".join(str(c) for c in opt["choices"]) + ")"
        default = opt.get("default", "")
        default = "`%s`" % (yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...")
                            if not isinstance(default, str) else default) if default != "" else ""
        desc = opt.get("description", "")
        desc = " ".join(desc) if isinstance(desc, list) else desc
        rows.append("| `%s` | %s | %s | %s |" % (name, cell(kind), cell(default), cell(desc)))
    return "\n".join(rows)


def render(role):
    with open(os.path.join(ROOT, "roles", role, "meta", "argument_specs.yml")) as f:
        spec = yaml.safe_load(f)["argument_specs"]["main"]
    path = os.path.join(ROOT, "roles", role, "README.md")
    with open(path) as f:
        text = f.read()
    head, _sep, rest = text.partition(BEGIN)
    _old, _sep, tail = rest.partition(END)
    return path, text, head + BEGIN + "\n" + table(spec) + "\n" + END + tail


def main(argv):
    stale = []
    for role in sorted(os.listdir(os.path.join(ROOT, "roles"))):
        if not os.path.isfile(os.path.join(ROOT, "roles", role, "meta", "argument_specs.yml")):
            continue
        path, old, new = render(role)
        if old != new:
            stale.append(role)
            if "--check" not in argv:
                with open(path, "w") as f:
                    f.write(new)
    if stale and "--check" in argv:
        print("README variables out of date for: %s (run tests/tools/role_readme.py)" % ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
