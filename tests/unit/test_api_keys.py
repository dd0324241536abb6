"""GATEWAY_API_KEYS parsing and the constant-time key comparison (no server)."""

import pytest

from services.gateway.api_keys import key_matches, load_api_keys


def test_empty_value_turns_keys_off():
    assert load_api_keys("") == []
    assert load_api_keys("  ") == []


def test_comma_list_strips_whitespace_and_drops_empty_entries():
    assert load_api_keys("a") == [b"a"]
    assert load_api_keys(" a , b,,c ") == [b"a", b"b", b"c"]


def test_a_value_with_no_key_is_an_error():
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(" , ,")


def test_file_with_comments_blank_lines_commas_and_crlf(tmp_path):
    path = tmp_path / "keys"
    path.write_bytes(b"# rotated 2026-11\r\nold-key\r\n\n  # indented comment\nnew-key, third\n")
    assert load_api_keys(f"@{path}") == [b"old-key", b"new-key", b"third"]


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(f"@{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(f"@{tmp_path}")  # a directory


def test_file_without_a_key_is_an_error(tmp_path):
    path = tmp_path / "keys"
    for text in ("", "\n\n", "# nothing but comments\n , \n"):
        path.write_text(text)
        with pytest.raises(ValueError, match="holds no key"):
            load_api_keys(f"@{path}")


def test_error_messages_never_contain_a_key(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# secret-looking comment\n")
    with pytest.raises(ValueError) as excinfo:
        load_api_keys(f"@{path}")
    assert "secret-looking" not in str(excinfo.value)


def test_key_matches_any_configured_key_exactly():
    keys = [b"key-one", b"key-two"]
    assert key_matches(b"key-one", keys) == b"key-one"
    assert key_matches(b"key-two", keys) == b"key-two"
    assert not key_matches(b"key", keys)
    assert not key_matches(b"key-one ", keys)
    assert not key_matches(b"", keys)
    assert not key_matches(b"key-one", [])
