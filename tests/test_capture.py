"""Library logs go to a file and the notebook shows one line."""
import logging
import os
import sys
import warnings

import pytest

from qlib.lab.capture import capture_logs


def test_every_stream_a_library_writes_to_goes_to_the_file(tmp_path, capfd):
    lib = logging.getLogger("qlib.tests.some_library")
    handler = logging.StreamHandler(sys.stderr)  # bound before the block, as transformers binds its handler
    lib.addHandler(handler)
    lib.propagate = False
    try:
        with capture_logs(tmp_path, "lib", "some library") as logs:
            print("printed line")
            lib.warning("logged through a handler made earlier")
            for _ in range(1000):
                warnings.warn("the same warning again", UserWarning)
            os.write(2, b"written to fd 2 by C code\n")
            sys.stderr.write("progress\r" * 50 + "\n")
    finally:
        lib.removeHandler(handler)
    out, err = capfd.readouterr()
    assert out == logs.summary() + "\n" and err == ""  # the notebook sees one line
    text = (tmp_path / "logs" / "lib.log").read_text()
    for piece in ("printed line", "logged through a handler made earlier", "written to fd 2 by C code"):
        assert piece in text
    assert text.count("UserWarning: the same warning again") == 1  # recorded once per place
    assert logs.summary().startswith("some library: ") and logs.summary().endswith("→ logs/lib.log")
    assert logs.lines >= 5 and logs.warnings >= 1
    assert handler.stream is sys.stderr  # streams restored
    print("after")
    assert capfd.readouterr().out == "after\n"


def test_an_error_inside_restores_the_streams(tmp_path, capfd):
    with pytest.raises(RuntimeError, match="library failed"):
        with capture_logs(tmp_path, "failing"):
            print("before the failure")
            raise RuntimeError("library failed")
    print("visible again")
    os.write(1, b"fd 1 again\n")
    out = capfd.readouterr().out
    assert "visible again" in out and "fd 1 again" in out and "before the failure" not in out
    assert "before the failure" in (tmp_path / "logs" / "failing.log").read_text()
