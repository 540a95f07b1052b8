"""Table-driven tests of unit rendering and systemd quoting."""

import pytest

from ansible_collections.homelab.immich.plugins.module_utils import systemd_unit as su


@pytest.mark.parametrize("word, expected", [
    ("plain", "plain"),
    ("FOO=bar", "FOO=bar"),
    ("a b", '"a b"'),
    ("", '""'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("it's", '"it\'s"'),
    ("tab\there", '"tab\\there"'),
    ("semi;colon", '"semi;colon"'),
    ("%h/data", "%h/data"),
])
def test_quote_word(word, expected):
    assert su.quote_word(word) == expected


@pytest.mark.parametrize("kind, value, expected", [
    # raw keys: written literally, a list repeats the key
    (su.RAW, "/srv/a b:/data:Z", ["/srv/a b:/data:Z"]),
    (su.RAW, ["/a:/a", "/b:/b"], ["/a:/a", "/b:/b"]),
    (su.RAW, True, ["true"]),
    (su.RAW, False, ["false"]),
    (su.RAW, 2283, ["2283"]),
    (su.RAW, None, []),
    (su.RAW, [None, "x"], ["x"]),
    (su.RAW, [], []),
    (su.RAW, '"quoted"', ['"quoted"']),
    # KEY=VALUE words: a string is one word, a mapping one word per item
    (su.PAIRS, "FOO=bar baz", ['"FOO=bar baz"']),
    (su.PAIRS, {"A": "1", "B": "two words", "C": 3, "D": None}, ["A=1", '"B=two words"', "C=3"]),
    (su.PAIRS, {"Q": 'it"s'}, ['"Q=it\\"s"']),
    (su.PAIRS, ["A=1", "B=x y"], ["A=1", '"B=x y"']),
    (su.PAIRS, {"P": "100%%"}, ["P=100%%"]),
    # command lines: a string as given, a list as quoted words, a list of lists as several lines
    (su.ARGS, "sleep 100", ["sleep 100"]),
    (su.ARGS, ["sleep", "100 200", "\\back"], ['sleep "100 200" "\\\\back"']),
    (su.ARGS, [["echo", "a"], ["echo", "b c"]], ["echo a", 'echo "b c"']),
])
def test_value_lines(kind, value, expected):
    assert su.value_lines("Container", "K", value, kind) == expected


@pytest.mark.parametrize("kind, value, message", [
    (su.RAW, "a\nb", "newline"),
    (su.RAW, "a\x00b", "NUL"),
    (su.RAW, "a\rb", "carriage return"),
    (su.RAW, "a\x07b", "control character"),
    (su.RAW, " lead", "leading or trailing whitespace"),
    (su.RAW, "trail ", "leading or trailing whitespace"),
    (su.RAW, "cont\\", "line continuation"),
    (su.RAW, "50%", "not a systemd specifier"),
    (su.RAW, "%Z", "not a systemd specifier"),
    (su.RAW, {"a": 1}, "mapping is only accepted"),
    (su.RAW, [["nested"]], "must be scalars"),
    (su.RAW, object(), "values must be strings"),
    (su.PAIRS, {"BAD KEY": "x"}, "not a valid variable"),
    (su.PAIRS, {"A=B": "x"}, "not a valid variable"),
    (su.PAIRS, "x\ny", "newline"),
    (su.ARGS, [], "empty command line"),
    (su.ARGS, "echo \\", "line continuation"),
])
def test_value_errors(kind, value, message):
    with pytest.raises(su.UnitValueError, match=message):
        su.value_lines("Container", "K", value, kind)


def test_specifiers_allowed_and_escaped():
    assert su.value_lines("Container", "Volume", "%h/photos:/data", su.RAW) == ["%h/photos:/data"]
    assert su.value_lines("Container", "K", "50%", su.RAW, specifiers=False) == ["50%%"]
    assert su.value_lines("Container", "K", "%h", su.RAW, specifiers=False) == ["%%h"]
    assert su.value_lines("Container", "K", {"P": "5%"}, su.PAIRS, specifiers=False) == ["P=5%%"]


def _kind(section, key):
    return {"Environment": su.PAIRS, "Exec": su.ARGS}.get(key, su.RAW)


def test_render_orders_sections_and_keeps_key_order():
    text = su.render(
        {"Install": {"WantedBy": "default.target"},
         "Container": {"Image": "img", "Environment": {"A": "1"}, "Exec": ["run", "x y"]},
         "X-Custom": {"Key": "v"},
         "Unit": {"Description": "d"}},
        _kind, section_order=("Unit", "Container", "Service", "Install"), header=["hello"])
    assert text == (
        "# hello\n\n"
        "[Unit]\nDescription=d\n\n"
        "[Container]\nImage=img\nEnvironment=A=1\nExec=run \"x y\"\n\n"
        "[Install]\nWantedBy=default.target\n\n"
        "[X-Custom]\nKey=v\n"
    )


def test_render_is_deterministic():
    sections = {"Container": {"Image": "i", "Volume": ["/a:/a", "/b:/b"]}}
    assert su.render(sections, _kind) == su.render(dict(sections), _kind)


@pytest.mark.parametrize("sections, message", [
    ({"Bad]": {}}, "not a valid unit section"),
    ({"": {}}, "not a valid unit section"),
    ({"Container": {"bad key": "v"}}, "not a valid key name"),
    ({"Container": {"1Key": "v"}}, "not a valid key name"),
    ({"Container": ["not", "a", "dict"]}, "must be a mapping"),
    ("not a dict", "sections must be a mapping"),
])
def test_render_rejects(sections, message):
    with pytest.raises(su.UnitValueError, match=message):
        su.render(sections, _kind)


def test_empty_section_is_rendered():
    assert su.render({"Network": None}, _kind) == "[Network]\n"
