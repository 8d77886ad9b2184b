"""json_lines reads a file another process is appending to: a read that lands mid-write (CI caught one,
with Envoy's access log) must not parse the unterminated tail."""

from __future__ import annotations

from tests.support.harness import json_lines


def test_an_unterminated_tail_is_left_for_the_next_read(tmp_path):
    log = tmp_path / "access.log"
    assert json_lines(log) == []
    log.write_bytes(b'{"request_id":"a","n":1}\n{"request_id":"b","comp')
    assert json_lines(log) == [{"request_id": "a", "n": 1}]
    with log.open("ab") as f:
        f.write(b'letion_tokens":12}\n\n')
    assert json_lines(log) == [{"request_id": "a", "n": 1}, {"request_id": "b", "completion_tokens": 12}]


def test_a_file_without_a_complete_line_has_no_entries(tmp_path):
    log = tmp_path / "access.log"
    log.write_bytes(b'{"request_id":"a"')
    assert json_lines(log) == []
