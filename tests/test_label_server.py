"""The labeling server (hh_jax/label/server.py) over real HTTP: the page and next pair,
labels in file order, every bad request refused with a 4xx leaving the store byte for byte
as it was, and concurrent posts losing and duplicating nothing."""

from __future__ import annotations

import http.client
import json
import os
import threading

import pytest
from test_label_store import lines_of, make_pair

from hh_jax import main as cli_main
from hh_jax.label import server as srv
from hh_jax.label import store as st

N_PAIRS = 25


@pytest.fixture
def running(tmp_path):
    """(server, pairs path, store path): a server on a free port, serving in a thread."""
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "labels.jsonl"
    st.write_pairs(pairs, [make_pair(i) for i in range(N_PAIRS)])
    server = srv.make_server(str(pairs), str(out), labeler="tester")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server, pairs, out
    server.shutdown()
    server.server_close()
    server.RequestHandlerClass.app.store.close()


def request(server, method, path, body=None, headers=None):
    """(status, parsed JSON or raw bytes) of one request on a fresh connection."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.getheader("Content-Type") == "application/json":
        data = json.loads(data)
    return resp.status, data


def test_page_next_and_labels_in_file_order(running):
    server, _, out = running
    assert server.url.startswith("http://127.0.0.1:")
    status, page = request(server, "GET", "/")
    assert status == 200 and b'id="choose-a"' in page
    assert request(server, "GET", "/page.js")[0] == 200
    status, nxt = request(server, "GET", "/api/next")
    assert status == 200 and nxt["pair"]["id"] == "p0"
    assert nxt["progress"] == {"done": 0, "total": N_PAIRS} and nxt["labeler"] == "tester"
    assert [t["role"] for t in nxt["pair"]["turns"]] == ["Human", "Assistant", "Human"]
    assert "meta" not in nxt["pair"]  # which policy wrote which is not shown
    status, ok = request(server, "POST", "/api/label", {"id": "p0", "choice": "b",
                                                        "strength": 2})
    assert status == 200 and ok["progress"]["done"] == 1
    assert request(server, "POST", "/api/label", {"id": "p2", "choice": "a"})[0] == 200
    assert request(server, "GET", "/api/next")[1]["pair"]["id"] == "p1"  # first unlabeled
    rows = lines_of(out)
    assert [(r["id"], r["choice"], r["strength"]) for r in rows] == [("p0", "b", 2),
                                                                     ("p2", "a", None)]
    assert rows[0]["labeler"] == "tester" and rows[0]["meta"]["round"] == 1
    assert rows[0]["meta"]["pairs_file"].endswith("pairs.jsonl")


BAD = [  # (method, path, body, extra headers, status)
    ("POST", "/api/label", {"id": "nope", "choice": "a"}, {}, 404),
    ("POST", "/api/label", {"id": "p0", "choice": "b"}, {}, 409),  # a replay of p0
    ("POST", "/api/label", b"x" * (srv.MAX_BODY + 1), {}, 413),
    ("POST", "/api/label", b"{}", {"Content-Length": str(100 << 20)}, 413),  # never read
    ("POST", "/api/label", b'{"id": "p1", "choice": ', {}, 400),
    ("POST", "/api/label", b"\xff\xfe", {}, 400),
    ("POST", "/api/label", {"id": "p1", "choice": "c"}, {}, 400),
    ("POST", "/api/label", {"id": "p1", "choice": "a", "strength": 7}, {}, 400),
    ("POST", "/api/label", {"id": "p1", "choice": "a", "strength": True}, {}, 400),
    ("POST", "/api/label", {"id": "p1", "choice": "a", "extra": 1}, {}, 400),
    ("POST", "/api/label", {"id": 1, "choice": "a"}, {}, 400),
    ("POST", "/api/label", b'["p1", "a"]', {}, 400),
    ("POST", "/api/label", {"id": "p1", "choice": "a"}, {"Content-Type": "text/plain"}, 415),
    ("POST", "/api/label", {"id": "p1", "choice": "a"}, {"Host": "evil.example:80"}, 403),
    ("GET", "/api/label", None, {}, 405),
    ("PUT", "/api/label", {"id": "p1", "choice": "a"}, {}, 405),
    ("POST", "/api/next", {"id": "p1", "choice": "a"}, {}, 405),
    ("POST", "/api/labels", {"id": "p1", "choice": "a"}, {}, 404),
    ("GET", "/../pairs.jsonl", None, {}, 404),
]


@pytest.mark.parametrize("method, path, body, headers, status", BAD,
                         ids=[f"{b[4]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_are_refused_and_change_nothing(running, method, path, body, headers,
                                                     status):
    server, _, out = running
    assert request(server, "POST", "/api/label", {"id": "p0", "choice": "a"})[0] == 200
    before = out.read_bytes()
    got, data = request(server, method, path, body, headers)
    assert got == status, data
    assert isinstance(data, dict) and data["error"]
    assert out.read_bytes() == before
    assert request(server, "GET", "/api/next")[1]["pair"]["id"] == "p1"  # still serving


def test_no_content_length_is_refused(running):
    server, _, out = running
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", "/api/label")
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()
    assert conn.getresponse().status == 411
    assert not out.exists() or out.read_bytes() == b""


def _concurrently(fn, n):
    barrier, results = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_twenty_concurrent_labels_lose_and_duplicate_nothing(running):
    server, _, out = running
    statuses = _concurrently(lambda i: request(server, "POST", "/api/label",
                                               {"id": f"p{i}", "choice": "ab"[i % 2]})[0], 20)
    assert statuses == [200] * 20
    rows = lines_of(out)
    assert sorted((r["id"], r["choice"]) for r in rows) == sorted(
        (f"p{i}", "ab"[i % 2]) for i in range(20))


def test_the_same_label_twenty_times_is_written_once(running):
    server, _, out = running
    statuses = _concurrently(lambda i: request(server, "POST", "/api/label",
                                               {"id": "p3", "choice": "ab"[i % 2]})[0], 20)
    assert sorted(statuses) == [200] + [409] * 19
    assert [r["id"] for r in lines_of(out)] == ["p3"]


def test_a_restarted_server_resumes(running, tmp_path):
    server, pairs, out = running
    for i in range(3):
        request(server, "POST", "/api/label", {"id": f"p{i}", "choice": "a"})
    again = srv.LabelApp(str(pairs), str(out), labeler="other")
    assert again.next()["pair"]["id"] == "p3"
    assert again.next()["progress"] == {"done": 3, "total": N_PAIRS}
    again.store.close()


def test_non_loopback_host_warns(tmp_path, caplog):
    pairs = tmp_path / "pairs.jsonl"
    st.write_pairs(pairs, [make_pair(0)])
    with caplog.at_level("WARNING", logger="hh_jax.label.server"):
        server = srv.make_server(str(pairs), str(tmp_path / "l.jsonl"), host="0.0.0.0")
    server.server_close()
    server.RequestHandlerClass.app.store.close()
    assert "anyone who can reach" in caplog.text
    assert srv.is_loopback("127.0.0.1") and srv.is_loopback("[::1]")
    assert srv.is_loopback("localhost") and not srv.is_loopback("evil.example")


def test_cli_export_and_errors(tmp_path, capsys):
    out, hh = tmp_path / "labels.jsonl", tmp_path / "hh.jsonl"
    with st.ComparisonStore(out) as store:
        store.append(make_pair(0), "b", labeler="ann")
    assert cli_main.main(["label", "export", "--store", str(out), "--out", str(hh)]) == 0
    assert "wrote 1 HH comparisons" in capsys.readouterr().out
    assert json.loads(hh.read_text())["chosen"].endswith("Assistant: answer B0 ünïcode")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    assert cli_main.main(["label", "--pairs", str(bad), "--out", str(out)]) == 1
    assert f"{bad}:1: missing_key" in capsys.readouterr().err
    assert cli_main.main(["label", "export", "--store", str(tmp_path / "none"),
                          "--out", str(hh)]) == 1
    assert os.path.exists(hh)  # the old export is untouched


def test_a_store_broken_while_serving_gets_a_500_not_a_hang(running):
    server, _, out = running
    with open(out, "a") as f:
        f.write("[1]\n")  # edited by hand: the store cannot be read any more
    status, data = request(server, "POST", "/api/label", {"id": "p1", "choice": "a"})
    assert status == 500 and "not_object" in data["error"]


def test_a_pairs_file_reusing_labeled_ids_with_other_texts_is_refused(tmp_path):
    """Resampled pairs under the same ids: the stored labels are not theirs."""
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "labels.jsonl"
    with st.ComparisonStore(out) as store:
        store.append(make_pair(0), "b", labeler="ann")  # chosen = response_b
        store.append(make_pair(1), "a", labeler="ann")
    swapped = {**make_pair(0), "response_a": make_pair(0)["response_b"],
               "response_b": make_pair(0)["response_a"]}  # either orientation is the pair
    st.write_pairs(pairs, [swapped, make_pair(1), make_pair(2)])
    srv.LabelApp(str(pairs), str(out)).store.close()
    st.write_pairs(pairs, [make_pair(0), make_pair(1, response_a=" resampled"), make_pair(2)])
    with pytest.raises(st.PairMismatch, match=r"(?s)labels.jsonl.*'p1'") as e:
        srv.LabelApp(str(pairs), str(out))
    assert str(pairs) in str(e.value) and "'p0'" not in str(e.value)
