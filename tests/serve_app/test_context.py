"""Request ids: unique within a process, and a forked child does not repeat its parent's."""

from __future__ import annotations

import os

from serve_app.context import new_request_id


def test_request_ids_are_unique_and_a_forked_child_gets_its_own() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id, then leave without cleanup
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child[:16] != new_request_id()[:16]
